"""create_app(settings): the FastAPI app, its lifespan, middleware and routes."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service.engine.runtime import Runtime
from service.http import errors as http_errors
from service.http import openapi
from service.http.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from service.http.routes import health, models, predict, sessions, steps
from service.oip import routes as v2
from service.oip.inference import OipInference
from service.sessions.manager import Clock
from service.settings import Settings
from service.ws import stream, streams

DESCRIPTION = """Streaming inference for Temporal Convolutional Networks.

A sequence is a list of T rows of `in_channels` numbers. `/predict` runs whole sequences;
sessions keep a stream's state on the server and advance it one push at a time, micro-batched
across sessions. One process owns its sessions: run one uvicorn worker per process.
"""


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = time.time,
    engine_socket: str | None = None,
) -> FastAPI:
    """Build an app; `clock` (Unix seconds) is injectable so tests control session TTLs. With
    `engine_socket` the app is an edge of the engine process there (service/engine/)."""
    if engine_socket is None:
        refuse_uvicorn_workers()
    runtime = Runtime(settings if settings is not None else Settings(), clock, engine_socket)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        grpc_edge = None
        try:
            if runtime.settings.grpc_port is not None:  # the OIP over gRPC (docs/grpc.md)
                from service.grpc.server import GrpcEdge

                grpc_edge = GrpcEdge(runtime, app.state.oip)
                await grpc_edge.start()
                app.state.grpc = grpc_edge
            yield
        finally:
            if grpc_edge is not None:
                await grpc_edge.stop()  # calls in progress finish first
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


UVICORN_WORKERS_REFUSED = (
    "tcnserve: refusing to run under `uvicorn --workers N`: each uvicorn worker would hold its "
    "own sessions, and a session's pushes landing on another worker would answer 404. Run "
    "`tcnserve serve --workers N` instead: N edge processes on one port in front of one engine "
    "that holds every session (docs/scaling.md)."
)


def refuse_uvicorn_workers() -> None:
    """Exit (uvicorn's startup-failure status, which stops its supervisor too) when this is one
    of several `uvicorn --workers` processes."""
    if multiprocessing.parent_process() is None:  # uvicorn's workers are spawned children
        return
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        argv = []
    workers = os.environ.get("WEB_CONCURRENCY", "1")
    for i, arg in enumerate(argv):
        if arg == "--workers" and i + 1 < len(argv):
            workers = argv[i + 1]
        elif arg.startswith("--workers="):
            workers = arg.partition("=")[2]
    if workers.isdigit() and int(workers) > 1:
        print(UVICORN_WORKERS_REFUSED, file=sys.stderr, flush=True)
        sys.exit(3)  # uvicorn.config.STARTUP_FAILURE
