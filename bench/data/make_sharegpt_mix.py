"""Writes ``sharegpt_mix.jsonl``: request shapes with ShareGPT's long-tailed lengths.

ShareGPT conversations have short-to-medium prompts with a long tail and answers of a
few hundred tokens. We ship only the shapes (prompt words and output tokens; capped so that
both fit a 2,048-token context), drawn
from log-normal distributions fitted to those published summaries, so the file is ours,
small and deterministic: ``python bench/data/make_sharegpt_mix.py`` rewrites it.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

ROWS = 500
SEED = 20261128


def main() -> None:
    rng = random.Random(SEED)
    lines = []
    for _ in range(ROWS):
        prompt = min(1100, max(4, int(rng.lognormvariate(math.log(80), 1.0))))
        output = min(768, max(8, int(rng.lognormvariate(math.log(180), 0.8))))
        lines.append(json.dumps({"prompt_words": prompt, "output_tokens": output}))
    (Path(__file__).parent / "sharegpt_mix.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
