"""GGUF to safetensors: dequantize a GGUF checkpoint into a directory vLLM loads.

Imports torch and transformers only when called: nothing heavy at import time.
"""

from __future__ import annotations

from pathlib import Path


def gguf_to_hf(gguf_file: Path, out_dir: Path) -> None:
    """Write config, tokenizer, chat template and ``model.safetensors`` into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.bfloat16)
    # transformers refuses to save a model that still carries the GGUF quantizer state.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
