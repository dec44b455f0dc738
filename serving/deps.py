"""Typed dependency aliases for the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from models.fleet import Fleet
from models.registry import Registry
from serving.middleware import request_id_of
from serving.proxy import Proxy


def _proxy(request: Request) -> Proxy:
    proxy: Proxy = request.app.state.proxy
    return proxy


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.proxy.fleet
    return fleet


def _request_id(request: Request) -> str:
    return request_id_of(request.scope)


ProxyDep = Annotated[Proxy, Depends(_proxy)]
RegistryDep = Annotated[Registry, Depends(_registry)]
FleetDep = Annotated[Fleet, Depends(_fleet)]
RequestIdDep = Annotated[str, Depends(_request_id)]
