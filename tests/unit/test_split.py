"""Traffic splits over versions: exact shares, sticky callers, pins by name or header."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import pytest

from models.config import ModelConfig, VersionConfig
from models.registry import Registry
from tests.unit.test_routing_gateway import client_for, settings


def canary(
    share: float = 25, sticky: Literal["none", "key", "conversation"] = "none"
) -> ModelConfig:
    return ModelConfig(
        name="smollm2", task="chat", current="v1",
        versions=[VersionConfig(version="v1", url="http://a"), VersionConfig(version="v2", url="http://b")],
        split={"v1": 100 - share, "v2": share}, sticky=sticky,
    )  # fmt: skip


def test_round_robin_gives_each_version_exactly_its_share() -> None:
    registry = Registry([canary(25)])
    served = Counter(registry.resolve("smollm2").version for _ in range(400))
    assert served == {"v1": 300, "v2": 100}
    assert registry.resolve("smollm2@v2").version == "v2"  # a pin ignores the split


def test_sticky_callers_stay_on_one_version() -> None:
    registry = Registry([canary(25, sticky="key")])
    for caller in ("alice", "bob", "carol"):
        seen = {registry.resolve("smollm2", sticky=caller).version for _ in range(20)}
        assert len(seen) == 1
    spread = Counter(registry.resolve("smollm2", sticky=f"k{n}").version for n in range(2000))
    assert 0.22 < spread["v2"] / 2000 < 0.28


def test_a_split_must_name_served_versions() -> None:
    with pytest.raises(ValueError, match="unknown version"):
        ModelConfig(
            name="m", task="chat", current="v1", versions=[VersionConfig(version="v1", url="x")],
            split={"v9": 1},
        )  # fmt: skip


def test_gateway_splits_labels_and_pins() -> None:
    config = settings({"v1": 1, "v2": 1})
    model = config.models[0].model_copy(update={"split": {"v1": 75, "v2": 25}})
    config = config.model_copy(update={"models": [model, config.models[1]]})
    body: dict[str, Any] = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
    with client_for(config, {}) as client:
        versions = Counter(
            client.post("/v1/chat/completions", json=body).headers["x-weir-model-version"]
            for _ in range(400)
        )
        pinned = client.post(
            "/v1/chat/completions", json=body, headers={"x-weir-model-version": "v2"}
        )
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert versions == {"v1": 300, "v2": 100}
    assert pinned.headers["x-weir-model-version"] == "v2"
    assert pinned.json()["model"] == "smollm2@v2"
    assert cards["smollm2"]["weir"]["split"] == {"v1": 0.75, "v2": 0.25}
    assert "weir" not in cards["smollm2@v1"]


def test_conversation_stickiness_at_the_gateway() -> None:
    config = settings({"v1": 1, "v2": 1})
    model = config.models[0].model_copy(
        update={"split": {"v1": 50, "v2": 50}, "sticky": "conversation"}
    )
    config = config.model_copy(update={"models": [model, config.models[1]]})
    with client_for(config, {}) as client:
        for topic in ("cats", "dogs", "boats", "trains"):
            body = {"model": "smollm2", "messages": [{"role": "user", "content": topic}]}
            seen = {
                client.post("/v1/chat/completions", json=body).headers["x-weir-model-version"]
                for _ in range(6)
            }
            assert len(seen) == 1, topic
