from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.settings import load_settings

CONFIG = """
[gateway]
port = 8123
api_keys = ["sk-one"]

[store]
path = "/tmp/weir-store"

[[models]]
name = "tiny"
task = "chat"
current = "a"

[[models.versions]]
version = "a"
weights = "smollm2-135m-instruct"
replicas = 2
engine_args = ["--max-model-len", "1024"]
"""


def test_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "weir.toml"
    path.write_text(CONFIG)
    settings = load_settings(path)
    assert settings.gateway.port == 8123
    assert [k.get_secret_value() for k in settings.gateway.api_keys] == ["sk-one"]
    assert settings.store.root == Path("/tmp/weir-store")
    (model,) = settings.models
    assert model.versions[0].replicas == 2
    assert "sk-one" not in repr(settings)  # keys are secrets


def test_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weir.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("WEIR_GATEWAY__PORT", "9001")
    assert load_settings(path).gateway.port == 9001


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.gateway.host == "127.0.0.1"
    assert [m.name for m in settings.models] == ["smollm2", "minilm"]


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "weir.toml"
    path.write_text("[gateway]\nprot = 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "absent.toml")


def test_the_host_kind_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``engines.host`` (env ``WEIR_ENGINES__HOST``) picks the engine flags; auto detects."""
    from models.engines import vllm_engine

    assert load_settings(None).engines.host == "auto"
    monkeypatch.setenv("WEIR_ENGINES__HOST", "cuda")
    settings = load_settings(None)
    assert settings.engines.host == "cuda"
    assert vllm_engine.host_kind(settings.engines.host) == "cuda"
    assert vllm_engine.host_kind("cpu") == "cpu"
    monkeypatch.setenv("WEIR_ENGINES__HOST", "tpu")
    with pytest.raises(ValidationError):
        load_settings(None)
