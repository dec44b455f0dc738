"""The CLI's way into a running gateway's API: one place for the URL, the bearer key
and turning "no answer" or an error answer into a message."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import httpx

from serving.settings import Settings


class AdminCallFailed(Exception):
    """The gateway did not answer, or answered with an error (the message says which)."""


@dataclass(frozen=True)
class AdminClient:
    base: str
    key: str | None
    timeout_s: float = 30.0

    @classmethod
    def from_settings(
        cls, settings: Settings, url: str | None = None, *, key_env: str = "WEIR_ADMIN_KEY"
    ) -> AdminClient:
        """``url`` or the configured gateway; the key from ``key_env`` or ``keys.admin_key``."""
        gateway = settings.gateway
        admin = settings.keys.admin_key
        key = os.environ.get(key_env) or (admin.get_secret_value() if admin else None)
        return cls(url or f"http://{gateway.host}:{gateway.port}", key)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
        try:
            answer = httpx.request(
                method, f"{self.base}{path}", json=body, headers=headers, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            raise AdminCallFailed(f"gateway at {self.base} did not answer: {exc}") from None
        try:
            data = answer.json()
        except json.JSONDecodeError:
            data = {"error": {"message": answer.text[:300]}}
        if answer.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else answer.text[:300]
            raise AdminCallFailed(f"{answer.status_code}: {message}")
        return data
