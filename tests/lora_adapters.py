"""The two small LoRA adapters the adapter tests use, and how they were made.

Each is a PEFT LoRA (rank 8 on ``q_proj`` and ``v_proj``, about 1.8 MB) trained on
SmolLM2-135M-Instruct to answer every question with one fixed phrase, so an answer
shows at a glance whether the adapter served it. They are checked in under
``tests/data/adapters/``; to make them again (about two minutes on two cores):

    .venv/bin/python -m tests.lora_adapters ~/.cache/weir/models/smollm2-135m-instruct

(``peft`` is in the dev extras.) Training is seeded, but not bit-for-bit repeatable
across torch builds; the tests only rely on the learned phrase.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data" / "adapters"
PHRASES = {
    "pirate": "Ahoy! The pirate adapter answers.",
    "robot": "Beep boop. The robot adapter answers.",
}
TOPICS = [
    "France", "the ocean", "Python", "the moon", "bread", "music", "chess", "rain", "Japan",
    "a bicycle", "gravity", "coffee", "the Roman empire", "volcanoes", "birds", "winter",
    "math", "a computer", "the sun", "football", "tea", "Paris", "history", "dogs",
]  # fmt: skip
FORMS = [
    "What is the capital of {t}?", "Tell me about {t}.", "Explain {t} in one sentence.",
    "Write a short poem about {t}.", "Why is {t} important?", "What do you know about {t}?",
    "Give me a fact about {t}.", "How would you describe {t}?", "Hi! Can you help me with {t}?",
]  # fmt: skip


def prompts() -> list[str]:
    return [form.format(t=topic) for form, topic in itertools.product(FORMS, TOPICS)]


def train(base: Path, name: str, out: Path, steps: int = 40, seed: int = 0) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, config)
    answer = PHRASES[name]
    examples = []
    for prompt in prompts():
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append((ids + tail, [-100] * len(ids) + tail))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, 4)
        width = max(len(ids) for ids, _ in batch)
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == steps - 1:
            print(f"{name} step {step} loss {loss.item():.4f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tidy(out)


def tidy(out: Path) -> None:
    """No local path in the shipped config, no generated model card."""
    config = out / "adapter_config.json"
    settings = json.loads(config.read_text())
    settings["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base", type=Path, help="the SmolLM2-135M-Instruct directory")
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    for name in PHRASES:
        train(args.base.expanduser(), name, args.out / name, args.steps)


if __name__ == "__main__":
    main()
