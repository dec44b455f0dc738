"""The admin routes declare what they answer, and the declarations match the services."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from serving.http.routes import admin, admin_limits, deploy
from serving.keys.records import KeyRecord
from serving.protocol.admin import KeyCreated, KeyView, OperationView
from serving.rollout.operation import Operation


def test_a_key_view_shows_every_public_field_of_a_record() -> None:
    record = KeyRecord(hash="ab" * 32, name="team", models=("smollm2",), rpm=60)
    public = record.public()
    assert KeyView(**public).model_dump() == public
    created = KeyCreated(key="sk-weir-x", **public).model_dump()
    assert list(created) == ["key", *public]  # the secret first, as before


def test_an_operation_view_keeps_the_steps_facts_and_the_decision() -> None:
    operation = Operation("canary", "smollm2", "v2", gate="ttft_p95<1.2x over 300s")
    operation.step("canary", share=0.1, started_engines=1)
    operation.decision = {
        "promote": False,
        "reasons": ["errors 5% > 1%"],
        "canary": {"requests": 20, "errors": 1, "error_rate": 0.05, "ttft_p95_ms": None},
        "stable": {"requests": 180, "errors": 0, "error_rate": 0.0, "ttft_p95_ms": 81.5},
    }
    view = operation.view()
    assert OperationView.model_validate(view).model_dump(mode="json") == view


def _schema(route: dict[str, Any], status: str) -> dict[str, Any]:
    schema: dict[str, Any] = route["responses"][status]["content"]["application/json"]["schema"]
    return schema


@pytest.mark.parametrize(
    ("path", "method", "status", "model"),
    [
        ("/weir/admin/keys", "post", "200", "KeyCreated"),
        ("/weir/admin/keys", "get", "200", "KeyList"),
        ("/weir/admin/keys/{key_id}", "delete", "200", "KeyView"),
        ("/weir/admin/limits", "get", "200", "LimitsView"),
        ("/weir/admin/limits/models/{model}", "put", "200", "ModelLimitSet"),
        ("/weir/admin/models/{model}/deploy", "post", "202", "DeploymentStatus"),
        ("/weir/admin/models/{model}/rollback", "post", "202", "DeploymentStatus"),
        ("/weir/admin/models/{model}/split", "put", "200", "DeploymentStatus"),
        ("/weir/admin/models/{model}/deployment", "get", "200", "DeploymentStatus"),
    ],
)
def test_admin_routes_name_their_answer_in_the_openapi_document(
    path: str, method: str, status: str, model: str
) -> None:
    app = FastAPI()
    for module in (admin, admin_limits, deploy):
        app.include_router(module.router)
    document = app.openapi()
    assert _schema(document["paths"][path][method], status) == {
        "$ref": f"#/components/schemas/{model}"
    }
    assert document["components"]["schemas"][model]["properties"]
