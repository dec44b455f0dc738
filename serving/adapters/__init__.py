"""LoRA adapters at runtime: which engines hold which adapters, loading and unloading
them (at start, on a restart or a join, on ``weir adapters add``), and the routing
preference for replicas that hold one."""
