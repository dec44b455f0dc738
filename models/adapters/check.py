"""Would this PEFT LoRA adapter load on that base model's engine? Every reason why not.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``.
It is checked against the base version's weights, without loading a tensor: the config
says LoRA (not DoRA, no bias, no extra saved modules, which vLLM refuses), its rank is
within the engine's ``--max-lora-rank``, every target module is a linear layer of the
base, and every tensor in the safetensors header is a ``lora_A``/``lora_B`` of a base
layer with the shapes that layer needs (A: rank x in, B: out x rank), its bytes within
the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_HEADER_BYTES = 100 << 20  # a safetensors header past this is not an adapter's
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass(frozen=True)
class AdapterInfo:
    """What the checks read: shown by ``weir adapters list`` and kept in the manifest."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_name: str  # what PEFT recorded as the base (a path or hub id; informative only)


def header(path: Path) -> dict[str, Any]:
    """A safetensors file's header; ``ValueError`` saying what is wrong with it."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("too short to be safetensors")
        length = int.from_bytes(head, "little")
        if length <= 0 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"header length {length} does not fit a file of {size} bytes")
        try:
            parsed = json.loads(handle.read(length))
        except ValueError:
            raise ValueError("header is not JSON") from None
    if not isinstance(parsed, dict):
        raise ValueError("header is not a JSON object")
    end = 0
    for name, tensor in parsed.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ValueError(f"tensor {name} has no data offsets")
        shape, dtype = tensor.get("shape"), tensor.get("dtype")
        if isinstance(shape, list) and dtype in _DTYPE_BYTES:
            count = 1
            for dim in shape:
                count *= int(dim)
            if int(offsets[1]) - int(offsets[0]) != count * _DTYPE_BYTES[dtype]:
                raise ValueError(f"tensor {name}: {shape} {dtype} does not fill its offsets")
        end = max(end, int(offsets[1]))
    if 8 + length + end > size:
        raise ValueError(f"tensors need {8 + length + end} bytes, the file has {size} (truncated)")
    return parsed


def base_linear_shapes(base: Path) -> dict[str, tuple[int, int]]:
    """Every 2-D ``*.weight`` of the base model: module name -> (out, in)."""
    shapes: dict[str, tuple[int, int]] = {}
    for path in sorted(base.glob("*.safetensors")):
        for name, tensor in header(path).items():
            if name == "__metadata__" or not name.endswith(".weight"):
                continue
            shape = tensor.get("shape")
            if isinstance(shape, list) and len(shape) == 2:
                shapes[name.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
    return shapes


def read_config(directory: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        raw = json.loads((directory / CONFIG).read_text())
    except OSError:
        return None, [f"no {CONFIG}"]
    except ValueError as exc:
        return None, [f"{CONFIG} is not JSON: {exc}"]
    if not isinstance(raw, dict):
        return None, [f"{CONFIG} is not a JSON object"]
    return raw, []


def _config_problems(config: dict[str, Any], max_rank: int) -> list[str]:
    problems: list[str] = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"rank r is {rank!r}, not a positive integer")
    elif rank > max_rank:
        problems.append(
            f"rank {rank} is over the engine's --max-lora-rank {max_rank}"
            " (raise max_lora_rank on the base version)"
        )
    for name, value in (config.get("rank_pattern") or {}).items():
        if isinstance(value, int) and value > max_rank:
            problems.append(f"rank_pattern gives {name} rank {value}, over {max_rank}")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM serves no DoRA adapters")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r}: vLLM serves only bias 'none'")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM loads none")
    targets = config.get("target_modules")
    if not targets:
        problems.append("target_modules is empty")
    elif not isinstance(targets, list | str):
        problems.append(f"target_modules is {targets!r}")
    return problems


def _targets(config: dict[str, Any]) -> tuple[str, ...]:
    targets = config.get("target_modules") or ()
    return (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)


def _weight_problems(
    weights: dict[str, Any], config: dict[str, Any], base: dict[str, tuple[int, int]]
) -> list[str]:
    problems: list[str] = []
    rank = config.get("r")
    pattern = config.get("rank_pattern") or {}
    seen = 0
    for name, tensor in weights.items():
        if name == "__metadata__":
            continue
        match = _LORA.match(name)
        if match is None:
            problems.append(f"tensor {name} is not a lora_A or lora_B weight")
            continue
        seen += 1
        module = match["module"]
        shape = tuple(tensor.get("shape") or ())
        own = next((v for k, v in pattern.items() if module.endswith(k)), rank)
        target = base.get(module)
        if target is None:
            problems.append(f"tensor {name}: the base model has no layer {module}")
            continue
        out_features, in_features = target
        want = (own, in_features) if match["ab"] == "A" else (out_features, own)
        if shape != want:
            problems.append(f"tensor {name} has shape {list(shape)}, the base needs {list(want)}")
    if seen == 0:
        problems.append(f"{WEIGHTS} holds no LoRA tensors")
    return problems


def problems(directory: Path, base: Path, max_rank: int) -> tuple[list[str], AdapterInfo | None]:
    """Every reason ``directory`` would not load on an engine of ``base`` started with
    ``--max-lora-rank max_rank`` (none: it would), and what it is when it would."""
    if not directory.is_dir():
        return [f"{directory} is not a directory"], None
    config, found = read_config(directory)
    if config is not None:
        found += _config_problems(config, max_rank)
    weights_path = directory / WEIGHTS
    weights: dict[str, Any] | None = None
    if not weights_path.is_file():
        extra = " (adapter_model.bin is not served: save with safetensors)" if (
            directory / "adapter_model.bin").is_file() else ""  # fmt: skip
        found.append(f"no {WEIGHTS}{extra}")
    else:
        try:
            weights = header(weights_path)
        except ValueError as exc:
            found.append(f"{WEIGHTS}: {exc}")
    try:
        base_shapes = base_linear_shapes(base)
    except (OSError, ValueError) as exc:
        return [*found, f"the base weights in {base} do not read: {exc}"], None
    if config is not None:
        leaves = {name.rsplit(".", 1)[-1] for name in base_shapes}
        for target in _targets(config):
            if target not in leaves and not any(n.endswith(target) for n in base_shapes):
                found.append(f"target module {target!r} is not a linear layer of the base model")
    if config is not None and weights is not None and isinstance(config.get("r"), int):
        found += _weight_problems(weights, config, base_shapes)
    if found or config is None:
        return found, None
    alpha = config.get("lora_alpha", config["r"])
    info = AdapterInfo(
        rank=int(config["r"]),
        alpha=float(alpha) if isinstance(alpha, int | float) else float(config["r"]),
        targets=_targets(config),
        base_name=str(config.get("base_model_name_or_path") or ""),
    )
    return [], info


def engine_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} is over vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")
