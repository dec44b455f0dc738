"""Rate limits and token quotas: per key and per model, exact across gateway processes."""
