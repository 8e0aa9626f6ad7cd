"""create_app(settings): the FastAPI app, its lifespan, middleware and routes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import http_errors, openapi
from service.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from service.oip_inference import OipInference
from service.routes import health, models, predict, sessions, steps, stream, streams, v2
from service.runtime import Runtime
from service.sessions import Clock
from service.settings import Settings

DESCRIPTION = """Streaming inference for Temporal Convolutional Networks.

A sequence is a list of T rows of `in_channels` numbers. `/predict` runs whole sequences;
sessions keep a stream's state on the server and advance it one push at a time, micro-batched
across sessions. One process owns its sessions: run one uvicorn worker per process.
"""


def create_app(settings: Settings | None = None, *, clock: Clock = time.time) -> FastAPI:
    """Build an app; `clock` (Unix seconds) is injectable so tests control session TTLs."""
    runtime = Runtime(settings if settings is not None else Settings(), clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    # FastAPIOffline: /docs and /redoc serve Swagger UI and ReDoc from the package, not a CDN,
    # so the docs work on a machine without internet access.
    app = FastAPIOffline(
        title="tcnserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan
    )
    app.state.runtime = runtime
    app.state.oip = OipInference(runtime)  # /v2: the Open Inference Protocol (docs/oip.md)
    http_errors.install(app)
    openapi.install(app)  # security schemes; each route lists only the errors it can answer
    # The LeanRoutes first and flat: FastAPI keeps an included router as a nested router
    # matched anew per request, which costs a push more than the push itself
    # (bench/asgi_path.py). Their routes carry their prefixes, tags and responses already, and
    # honour dependency overrides themselves. The other routes are included as usual.
    for router in (sessions.lean_router, steps.router, predict.router, v2.lean_router):
        app.router.routes.extend(router.routes)
    for module in (sessions, stream, streams, models, health, v2):
        app.include_router(module.router)
    settings = runtime.settings
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        budget=runtime.inflight,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(ApiKeyMiddleware, api_keys=runtime.api_keys)  # before any body is read
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics)  # outermost of ours
    return app
