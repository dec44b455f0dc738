from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.integration.stack import Stack, start_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_stack_shutdown stops the session's stack: it runs after every other test,
    whatever the files are named (it ran mid-suite once a later file was added)."""
    last = [i for i in items if i.path.name == "test_stack_shutdown.py"]
    if not last:
        return
    rest = [i for i in items if i.path.name != "test_stack_shutdown.py"]
    here = [n for n, i in enumerate(rest) if i.path.parent == last[0].path.parent]
    at = here[-1] + 1 if here else len(rest)  # right after the last integration test
    items[:] = rest[:at] + last + rest[at:]
