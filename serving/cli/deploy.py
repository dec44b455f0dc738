"""``weir deploy``, ``weir rollback``, ``weir deployments``: rollouts on a running gateway.

They call the gateway's admin API (``keys.admin_key``, or ``WEIR_ADMIN_KEY``) and follow
the rollout's progress until it ends, printing each step; the exit status is 0 when the
rollout did what was asked (a gated canary: promoted), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from serving.cli.admin_client import AdminCallFailed, AdminClient
from serving.settings import load_settings

ENDED = {"done", "failed", "promoted", "rolled_back", "canary"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h)?$")


def duration_s(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h`` to seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 5m or 1h")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, None: 1}[match[2]]


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient.from_settings(load_settings(args.config), args.url)


def follow(client: AdminClient, model: str, timeout_s: float, out: Any = sys.stdout) -> int:
    """Print the rollout's steps as they happen; its exit status."""
    shown = 0
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.call("GET", f"/weir/admin/models/{model}/deployment")
        operation = status.get("operation") or {}
        steps = operation.get("steps", [])
        for step in steps[shown:]:
            facts = {k: v for k, v in step.items() if k not in ("phase", "at_s")}
            extra = " ".join(f"{k}={v}" for k, v in facts.items())
            print(f"  {step['at_s']:7.1f}s  {step['phase']:<10} {extra}", file=out, flush=True)
        shown = len(steps)
        if operation.get("phase") in ENDED:
            break
        if time.monotonic() > deadline:
            print(f"weir: still {operation.get('phase')} after {timeout_s:g}s; see"
                  f" `weir deployments {model}`", file=out)  # fmt: skip
            return 1
        time.sleep(0.5)
    decision = operation.get("decision")
    if decision:
        print("gate: " + ("promote" if decision["promote"] else "roll back"), file=out)
        for reason in decision["reasons"]:
            print(f"  {reason}", file=out)
        print(f"  canary {decision['canary']}\n  stable {decision['stable']}", file=out)
    if operation.get("error"):
        print(f"weir: {operation['kind']} failed, traffic unchanged: {operation['error']}",
              file=out)  # fmt: skip
        return 1
    print(f"{model}: current {status['current']}, split {status['split']},"
          f" running {status['running']}", file=out)  # fmt: skip
    return 1 if operation.get("phase") == "rolled_back" and operation["kind"] != "rollback" else 0


def deploy(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"version": args.version}
    for name in ("canary", "weights", "replicas", "promote_if"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.window is not None:
        body["window_s"] = args.window
    if args.engine_args is not None:
        body["engine_args"] = args.engine_args.split()
    doing = f"deploying {args.model}@{args.version}" + (
        f" as a {args.canary:g}% canary" if args.canary else ""
    )
    return _start_and_follow(args, "deploy", body, doing)


def rollback(args: argparse.Namespace) -> int:
    return _start_and_follow(args, "rollback", None, f"rolling back {args.model}")


def _start_and_follow(
    args: argparse.Namespace, action: str, body: dict[str, Any] | None, doing: str
) -> int:
    """POST the rollout, then follow it (unless --no-wait); a refusal is exit 1."""
    client = _client(args)
    try:
        client.call("POST", f"/weir/admin/models/{args.model}/{action}", body)
        print(f"weir: {doing}")
        return 0 if args.no_wait else follow(client, args.model, args.timeout)
    except AdminCallFailed as exc:
        print(f"weir: refused: {exc}", file=sys.stderr)
        return 1


def deployments(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        print(json.dumps(client.call("GET", f"/weir/admin/models/{args.model}/deployment"),
                         indent=2))  # fmt: skip
    except AdminCallFailed as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return 1
    return 0


def add_commands(commands: Any) -> None:
    def common(cmd: argparse.ArgumentParser, waits: bool = True) -> None:
        cmd.add_argument("model")
        cmd.add_argument("--url", default=None, help="gateway base URL (default: the config's)")
        if waits:
            cmd.add_argument("--no-wait", action="store_true", help="do not follow progress")
            cmd.add_argument("--timeout", type=duration_s, default=3600.0,
                             help="stop following after this long")  # fmt: skip

    cmd = commands.add_parser("deploy", help="start a version's engines and shift traffic to it")
    common(cmd)
    cmd.add_argument("version")
    cmd.add_argument("--canary", type=float, default=None, help="percent of traffic (0-100)")
    cmd.add_argument("--promote-if", default=None,
                     help='gate for the canary, e.g. "ttft_p95<1.2x,errors<1%%"')  # fmt: skip
    cmd.add_argument("--window", type=duration_s, default=None, help="gate window (e.g. 5m)")
    cmd.add_argument("--weights", default=None, help="store entry or directory (new version)")
    cmd.add_argument("--engine-args", default=None, help="engine flags for a new version")
    cmd.add_argument("--replicas", type=int, default=None)
    cmd.set_defaults(func=deploy)

    back = commands.add_parser("rollback", help="back to the stable or previous version")
    common(back)
    back.set_defaults(func=rollback)

    show = commands.add_parser("deployments", help="a model's versions, split and last rollout")
    common(show, waits=False)
    show.set_defaults(func=deployments)
