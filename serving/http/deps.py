"""Typed dependency aliases for the routes.

All async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop on
every request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request

from models.engines.fleet import Fleet
from models.registry import Registry
from serving.core.proxy import Proxy
from serving.errors import RouteNotFound

T = TypeVar("T")


def configured(service: T | None, off: str) -> T:
    """``service``, or a 404 saying why the route is off (no key store, limits off)."""
    if service is None:
        raise RouteNotFound(off)
    return service


async def _proxy(request: Request) -> Proxy:
    proxy: Proxy = request.app.state.proxy
    return proxy


async def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.proxy.fleet
    return fleet


ProxyDep = Annotated[Proxy, Depends(_proxy)]
RegistryDep = Annotated[Registry, Depends(_registry)]
FleetDep = Annotated[Fleet, Depends(_fleet)]
