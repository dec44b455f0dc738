from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.config import ModelConfig, VersionConfig, default_models
from models.errors import ConfigError, ModelNotFound
from models.registry import Registry
from models.types import VersionKey


def two_versions() -> ModelConfig:
    return ModelConfig(
        name="chat",
        task="chat",
        current="v1",
        versions=[
            VersionConfig(version="v1", weights="w1"),
            VersionConfig(version="v2", url="http://127.0.0.1:9"),
        ],
    )


def test_alias_resolves_to_current_version() -> None:
    served = Registry([two_versions()]).resolve("chat")
    assert (served.model, served.version, served.task) == ("chat", "v1", "chat")
    assert served.key == VersionKey("chat", "v1")
    assert str(served.key) == "chat@v1"


def test_pinned_version() -> None:
    assert Registry([two_versions()]).resolve("chat@v2").version == "v2"


@pytest.mark.parametrize("name", ["nope", "chat@v9", "@v1", ""])
def test_unknown_names_are_not_found(name: str) -> None:
    with pytest.raises(ModelNotFound) as caught:
        Registry([two_versions()]).resolve(name)
    assert caught.value.param == "model"


def test_defaults_serve_chat_and_embeddings() -> None:
    registry = Registry(default_models())
    assert registry.resolve("smollm2").task == "chat"
    assert registry.resolve("minilm").task == "embed"
    assert [str(v.key) for v in registry.served_versions()] == [
        "smollm2@135m-instruct",
        "minilm@l6-v2",
    ]


def test_model_configured_twice_is_refused() -> None:
    with pytest.raises(ConfigError):
        Registry([two_versions(), two_versions()])


def test_current_must_be_a_version() -> None:
    with pytest.raises(ValidationError, match="current"):
        ModelConfig(
            name="m", task="chat", current="v3", versions=[VersionConfig(version="v1", weights="w")]
        )


def test_version_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        VersionConfig(version="v1")
    with pytest.raises(ValidationError, match="exactly one"):
        VersionConfig(version="v1", weights="w", url="http://x")


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValidationError):
        VersionConfig(version="v 1", weights="w")
    with pytest.raises(ValidationError):
        ModelConfig(
            name="a/b",
            task="chat",
            current="v1",
            versions=[VersionConfig(version="v1", weights="w")],
        )
