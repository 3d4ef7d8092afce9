"""Liveness and readiness, unauthenticated, for load balancers and orchestrators."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from chatservice.api.deps import Parts
from chatservice.api.responses import JSONBody, errors, json_too
from chatservice.api.routing import CheckedRoute

router = APIRouter(tags=["health"], route_class=CheckedRoute)

CHECK_TIMEOUT = 2.0


@router.get("/healthz", responses=errors(authenticated=False))
async def healthz() -> JSONBody:
    return JSONBody({"status": "ok"})


@router.get(
    "/readyz",
    responses={
        **json_too(503, "a dependency is unreachable: `checks` says which"),
        **errors(authenticated=False),
    },
)
async def readyz(parts: Parts) -> JSONBody:
    checks: dict[str, str] = {}
    for name, probe in (("database", parts.database.ping), ("bus", parts.bus.ping)):
        try:
            await asyncio.wait_for(probe(), CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:  # report, don't raise: this endpoint exists to say "no"
            checks[name] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONBody(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )
