"""Probes and metrics: /healthz (alive), /readyz (models warmed, not draining), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.http.deps import RuntimeDep
from service.http.errors import error_body
from service.http.schemas import ErrorBody

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: 200 while the process runs")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every model is warmed, 503 while draining",
    responses={503: {"model": ErrorBody, "description": "not ready or draining (Retry-After)"}},
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    if runtime.ready:
        return JSONResponse({"status": "ready", "models": runtime.registry.names()})
    if runtime.draining:
        body = error_body("draining", "this server is shutting down")
    elif runtime.load_error:
        body = error_body("not_ready", f"model loading failed: {runtime.load_error}")
    else:
        body = error_body("not_ready", "models are loading")
    return JSONResponse(body, 503, headers={"Retry-After": str(runtime.settings.retry_after_s)})


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(await runtime.render_metrics(), media_type=runtime.metrics.content_type)
