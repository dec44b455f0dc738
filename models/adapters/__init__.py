"""LoRA adapters on a served base version: checked and stored like weights (``check``,
``store``), and the engine flags that let an engine serve them (``engine_args``)."""
