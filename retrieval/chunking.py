"""Split text into overlapping chunks of at most N tokens (the embedding model's tokens)."""

from __future__ import annotations

import tokenizers


def split(text: str, tokenizer: tokenizers.Tokenizer, size: int, overlap: int) -> list[str]:
    """Windows of ``size`` tokens, each starting ``size - overlap`` after the last, cut at
    the tokens' character offsets so no word is split inside."""
    if size <= overlap:
        raise ValueError(f"chunk size {size} must exceed the overlap {overlap}")
    if tokenizer.truncation is not None:
        tokenizer.no_truncation()  # the model's own limit would cut the document short
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    offsets = [o for o in tokenizer.encode(text, add_special_tokens=False).offsets if o != (0, 0)]
    if not offsets:
        return [text] if text.strip() else []
    chunks = []
    step = size - overlap
    for start in range(0, len(offsets), step):
        window = offsets[start : start + size]
        chunks.append(text[window[0][0] : window[-1][1]].strip())
        if start + size >= len(offsets):
            break
    return [c for c in chunks if c]
