"""Typed dependency aliases for the routes.

All async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop on
every request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from models.engines.fleet import Fleet
from models.registry import Registry
from serving.core.proxy import Proxy


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
