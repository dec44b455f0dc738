"""``bench.config_builder``: the weir.toml files the rigs start ``weir serve`` with."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bench.config_builder import model, render, weir_toml
from serving.settings import load_settings


def test_a_rig_config_is_a_valid_weir_toml(tmp_path: Path) -> None:
    text = weir_toml(
        gateway={"port": 8123, "api_keys": ["k"]},
        engines={"log_dir": tmp_path / "logs"},
        limits={"model_tpm": {"smollm2": 900}},
        models=[
            model("smollm2", "mock", url="http://127.0.0.1:9", routing={"max_queue": 4},
                  tokenizer=None),
            model("minilm", "l6", task="embed", urls=["http://a:1", "http://b:2"]),
        ],
    )  # fmt: skip
    path = tmp_path / "weir.toml"
    path.write_text(text)
    settings = load_settings(path)
    assert settings.gateway.port == 8123
    assert settings.limits.model_tpm == {"smollm2": 900}
    chat, embed = settings.models
    assert (chat.current, chat.routing.max_queue) == ("mock", 4)
    assert chat.versions[0].url == "http://127.0.0.1:9"
    assert chat.versions[0].tokenizer is None  # None leaves the key out
    assert (embed.task, embed.versions[0].urls) == ("embed", ["http://a:1", "http://b:2"])


def test_values_round_trip_through_toml() -> None:
    config = {
        "a": {"s": 'quote " and \\ and é', "t": True, "f": 0.5, "i": 3, "l": [1, 2]},
        "models": [{"name": "m", "versions": [{"version": "v", "cpus": []}]}],
    }
    assert tomllib.loads(render(config)) == config


def test_no_models_keeps_the_built_in_ones() -> None:
    assert "models" not in tomllib.loads(weir_toml(gateway={"port": 1}))


def test_a_value_toml_cannot_hold_is_refused() -> None:
    with pytest.raises(TypeError, match="no TOML"):
        render({"a": {"b": object()}})
