"""Text a tenant puts in a batch that the store could not keep or read back.

On PostgreSQL a string holding NUL cannot be stored in a text column (``lines.custom_id``:
the batch's creation failed with a 503 "batch store unavailable"), and a JSON record holding
``\\u0000`` cannot be cast to jsonb: a running batch whose ``metadata`` held one made the
expiry sweep's query (which reads every running batch's ``input_file_id``) fail, for every
tenant, until the batch ended. A lone surrogate is not UTF-8: orjson refused the record, a
500. They are refused where the tenant sends them; the gateway here on SQLite (the
answers do not depend on the store).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.fakes.engine import FakeEngine
from tests.unit.test_batches import CHAT, chat_line, jsonl, make_client

ALICE = {"authorization": "Bearer sk-alice"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(FakeEngine(), tmp_path_factory.mktemp("text"), poll_s=0.05) as made:
        yield made


def upload(client: TestClient, content: bytes) -> str:
    uploaded = client.post("/v1/files", files={"file": ("in.jsonl", content)},
                           data={"purpose": "batch"}, headers=ALICE)  # fmt: skip
    assert uploaded.status_code == 200, uploaded.text
    file_id: str = uploaded.json()["id"]
    return file_id


@pytest.mark.parametrize(
    "metadata",
    ['{"k": "a\\u0000b"}', '{"a\\u0000": "v"}', '{"k": "\\ud800"}', '{"\\udfff": "v"}',
     '{"' + "k" * 65 + '": "v"}', '{"k": "' + "v" * 513 + '"}'],  # OpenAI's 64 and 512
)  # fmt: skip
def test_metadata_unstorable_or_too_long_is_a_400(client: TestClient, metadata: str) -> None:
    source = upload(client, jsonl([chat_line(1)]))
    before = client.get("/v1/batches", headers=ALICE).json()["data"]
    body = (f'{{"input_file_id": "{source}", "endpoint": "{CHAT}", '
            f'"completion_window": "24h", "metadata": {metadata}}}')  # fmt: skip
    made = client.post("/v1/batches", content=body.encode(),
                       headers=ALICE | {"content-type": "application/json"})  # fmt: skip
    assert made.status_code == 400, made.text
    error = made.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "metadata")
    assert client.get("/v1/batches", headers=ALICE).json()["data"] == before  # none made


def test_a_line_whose_custom_id_holds_nul_fails_the_batch_naming_it(client: TestClient) -> None:
    line: dict[str, Any] = chat_line(1) | {"custom_id": "a\x00b"}
    source = upload(client, jsonl([chat_line(2), line]))
    made = client.post("/v1/batches", json={"input_file_id": source, "endpoint": CHAT,
                                            "completion_window": "24h"}, headers=ALICE)  # fmt: skip
    assert made.status_code == 200, made.text
    batch = made.json()
    assert batch["status"] == "failed"
    [error] = batch["errors"]["data"]
    assert (error["line"], error["param"]) == (2, "custom_id")


def test_metadata_and_custom_ids_of_other_text_are_kept(client: TestClient) -> None:
    source = upload(client, jsonl([chat_line(1) | {"custom_id": "é \t🙂"}]))
    spec = {"input_file_id": source, "endpoint": CHAT, "completion_window": "24h",
            "metadata": {"k é": "v\t🙂"}}  # fmt: skip
    made = client.post("/v1/batches", json=spec, headers=ALICE)
    assert made.status_code == 200, made.text
    assert made.json()["status"] == "in_progress"
    assert made.json()["metadata"] == {"k é": "v\t🙂"}
