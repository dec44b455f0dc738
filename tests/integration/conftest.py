from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import openai
import pytest

from tests.integration.stack import Stack, stack_config, stack_workers, start_stack


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    workers = stack_workers()  # WEIR_TEST_WORKERS: N gateway processes sharing one Redis
    if workers == 1:
        running = start_stack(tmp_path_factory.mktemp("stack"))
    else:
        config = partial(stack_config, redis_url=request.getfixturevalue("redis_url"))
        running = start_stack(tmp_path_factory.mktemp("stack"), config, workers=workers)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stack: uses the session's stack (`make integration-workers` runs these)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's stack are marked ``stack`` (``-m stack``). test_stack_shutdown
    stops that stack: it runs after every other test, whatever the files are named (it ran
    mid-suite once a later file was added)."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker("stack")
    last = [i for i in items if i.path.name == "test_stack_shutdown.py"]
    if not last:
        return
    rest = [i for i in items if i.path.name != "test_stack_shutdown.py"]
    here = [n for n, i in enumerate(rest) if i.path.parent == last[0].path.parent]
    at = here[-1] + 1 if here else len(rest)  # right after the last integration test
    items[:] = rest[:at] + last + rest[at:]
