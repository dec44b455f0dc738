"""``weir`` refuses unsafe or impossible starts before anything is launched."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.cli.main import main
from tests.redis_server import dead_port


def test_non_loopback_without_keys_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err


def test_missing_weights_name_the_pull_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "weir.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "empty-store"}"\n')
    assert main(["--config", str(config), "serve", "--port", "0"]) == 1
    assert "weir models pull smollm2-135m-instruct" in capsys.readouterr().err


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--config", str(tmp_path / "nope.toml"), "serve"])


def test_models_list_and_verify_an_empty_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--store", str(tmp_path), "list"]) == 0
    assert main(["models", "--store", str(tmp_path), "verify"]) == 0
    assert main(["models", "--store", str(tmp_path), "verify", "ghost"]) == 1
    assert "weir models pull ghost" in capsys.readouterr().out


def test_pull_of_an_unknown_model_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--store", str(tmp_path), "pull", "gpt-17"]) == 1
    assert "No pull recipe" in capsys.readouterr().err


def test_deploy_and_rollback_say_when_the_gateway_does_not_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with dead_port() as port:  # nothing listens there, nor can while the block runs
        url = f"http://127.0.0.1:{port}"
        assert main(["deploy", "smollm2", "v2", "--canary", "10", "--url", url]) == 1
        assert main(["rollback", "smollm2", "--url", url]) == 1
        assert main(["deployments", "smollm2", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.count(f"gateway at {url} did not answer") == 3


def test_durations_read_like_people_write_them() -> None:
    from serving.cli.deploy import duration_s

    assert [duration_s(t) for t in ("90", "90s", "5m", "1.5h")] == [90, 90, 300, 5400]
    with pytest.raises(Exception, match="not a duration"):
        duration_s("five minutes")


def test_python_dash_m_passes_the_exit_code_on() -> None:
    """``python -m serving.cli`` (how tests and the stack start ``weir``) exits with the
    command's own code, not 0 (a failed deploy must fail the shell)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "limits", "set", "smollm2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "give --tpm" in done.stderr
