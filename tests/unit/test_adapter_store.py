"""The adapter store: an adapter is checked against its base's layer shapes and the
engine's --max-lora-rank, refused with every reason, else copied, hashed and verified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from models.adapters import check
from models.adapters.engine_args import engine_args, engine_env
from models.adapters.errors import AdapterNotInStore, AdapterRefused
from models.adapters.store import AdapterStore, Base
from models.config import VersionConfig
from models.errors import VerificationFailed
from serving.cli.main import main

LAYERS = {"q_proj": (8, 6), "v_proj": (4, 6)}  # module -> (out, in)


def make_base(root: Path) -> Path:
    base = root / "base"
    base.mkdir()
    tensors = {
        f"model.layers.{i}.self_attn.{m}.weight": np.zeros(shape, np.float32)
        for i in range(2)
        for m, shape in LAYERS.items()
    }
    save_file(tensors, str(base / "model.safetensors"))
    return base


def make_adapter(root: Path, name: str = "lora", rank: int = 2, **config: object) -> Path:
    directory = root / name
    directory.mkdir()
    tensors: dict[str, np.ndarray] = {}
    for i in range(2):
        for module, (out, inp) in LAYERS.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ones((rank, inp), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.ones((out, rank), np.float32)
    save_file(tensors, str(directory / check.WEIGHTS))
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
                "target_modules": ["q_proj", "v_proj"]}  # fmt: skip
    settings.update(config)
    (directory / check.CONFIG).write_text(json.dumps(settings))
    return directory


def base(root: Path, max_rank: int = 16) -> Base:
    return Base("tiny", "v1", root / "base", max_rank)


def test_a_sound_adapter_is_stored_hashed_and_verified(tmp_path: Path) -> None:
    make_base(tmp_path)
    source = make_adapter(tmp_path)
    store = AdapterStore(tmp_path / "store")
    stored = store.add("pirate", source, base(tmp_path))
    assert (stored.rank, stored.targets, stored.base_model, stored.base_version) == (
        2, ("q_proj", "v_proj"), "tiny", "v1",
    )  # fmt: skip
    assert stored.path == tmp_path / "store" / "adapters" / "pirate"
    assert sorted(p.name for p in stored.path.iterdir()) == sorted(
        [check.CONFIG, check.WEIGHTS, "weir-manifest.json"]
    )
    assert [a.name for a in store.of_base("tiny", "v1")] == ["pirate"]
    assert store.of_base("tiny", "v2") == []
    weights = stored.path / check.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(VerificationFailed, match="sha256"):
        store.verify("pirate")


def test_every_reason_is_given_at_once(tmp_path: Path) -> None:
    make_base(tmp_path)
    source = make_adapter(
        tmp_path, rank=32, use_dora=True, bias="all", target_modules=["q_proj", "gate_proj"]
    )
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterRefused) as refused:
        store.add("Bad:Name", source, base(tmp_path, max_rank=16))
    problems = refused.value.problems
    assert any("must match" in p for p in problems)
    assert any("rank 32 is over the engine's --max-lora-rank 16" in p for p in problems)
    assert any("DoRA" in p for p in problems)
    assert any("bias" in p for p in problems)
    assert any("'gate_proj' is not a linear layer" in p for p in problems)
    assert not (tmp_path / "store" / "adapters").exists()  # nothing written


def test_shapes_must_fit_the_base(tmp_path: Path) -> None:
    make_base(tmp_path)
    source = make_adapter(tmp_path)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 7)),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, 2)),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": np.ones((2, 6)),
        "base_model.model.lm_head.weight": np.ones((2, 2)),
    }
    save_file(tensors, str(source / check.WEIGHTS))
    problems, info = check.problems(source, tmp_path / "base", 16)
    assert info is None
    wrong = "q_proj.lora_A.weight has shape [2, 7], the base needs [2, 6]"
    assert any(wrong in p for p in problems)
    assert any("has no layer model.layers.9.self_attn.q_proj" in p for p in problems)
    assert any("lm_head.weight is not a lora_A or lora_B" in p for p in problems)


def test_broken_files_are_named(tmp_path: Path) -> None:
    make_base(tmp_path)
    source = make_adapter(tmp_path)
    weights = source / check.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    (source / check.CONFIG).write_text("{not json")
    problems, _ = check.problems(source, tmp_path / "base", 16)
    assert any("adapter_config.json is not JSON" in p for p in problems)
    assert any("truncated" in p or "does not fill" in p for p in problems)
    empty = tmp_path / "empty"
    empty.mkdir()
    problems, _ = check.problems(empty, tmp_path / "base", 16)
    assert problems == ["no adapter_config.json", "no adapter_model.safetensors"]


def test_a_second_add_and_unknown_names_are_refused(tmp_path: Path) -> None:
    make_base(tmp_path)
    source = make_adapter(tmp_path)
    store = AdapterStore(tmp_path / "store")
    store.add("pirate", source, base(tmp_path))
    with pytest.raises(AdapterRefused, match="already"):
        store.add("pirate", source, base(tmp_path))
    assert store.remove("pirate").name == "pirate"
    with pytest.raises(AdapterNotInStore, match="weir adapters add ghost"):
        store.get("ghost")
    assert store.entries() == []


def test_engine_flags_follow_the_version() -> None:
    plain = VersionConfig(version="v1", weights="w")
    assert engine_args(plain) == []
    assert engine_env(plain) == {}
    lora = VersionConfig(version="v1", weights="w", adapters=["pirate"], max_loras=2,
                         max_lora_rank=8)  # fmt: skip
    assert engine_args(lora) == ["--enable-lora", "--max-loras", "2", "--max-cpu-loras", "2",
                                 "--max-lora-rank", "8"]  # fmt: skip
    assert engine_env(lora) == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def test_cli_add_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_base(tmp_path)
    source = make_adapter(tmp_path)
    config = tmp_path / "weir.toml"
    config.write_text(
        f'[store]\npath = "{tmp_path / "store"}"\n'
        '[[models]]\nname = "tiny"\ntask = "chat"\ncurrent = "v1"\n'
        f'[[models.versions]]\nversion = "v1"\nweights = "{tmp_path / "base"}"\nlora = true\n'
    )
    (tmp_path / "base" / "config.json").write_text("{}")  # what resolve() asks of a directory
    cli = ["--config", str(config), "adapters"]
    assert main([*cli, "add", "pirate", "--base", "tiny@v1", "--path", str(source),
                 "--offline"]) == 0  # fmt: skip
    assert "rank 2 on q_proj, v_proj" in capsys.readouterr().out
    bad = make_adapter(tmp_path, "bad", rank=32)
    assert main([*cli, "add", "big", "--base", "tiny", "--path", str(bad), "--offline"]) == 1
    assert "rank 32 is over" in capsys.readouterr().err
    assert main([*cli, "add", "x", "--base", "nope", "--path", str(bad), "--offline"]) == 1
    assert "no model 'nope'" in capsys.readouterr().err
    assert main([*cli, "list"]) == 0
    assert "tiny:pirate" in capsys.readouterr().out
    assert main([*cli, "verify"]) == 0
    assert main([*cli, "remove", "pirate", "--offline"]) == 0
    assert main([*cli, "remove", "pirate", "--offline"]) == 1
