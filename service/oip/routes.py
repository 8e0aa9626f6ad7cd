"""The Open Inference Protocol v2 on HTTP (KServe v2, Triton's HTTP API), beside /v1.

Health, server and model metadata, readiness, and inference with the binary tensor data and
sequence extensions (docs/oip.md). The codec is service/oip/decode.py; requests run through
service/oip/inference.py on the same sessions and workers as /v1. Errors are the protocol's
`{"error": "message"}` (service/http/errors.py answers in that form under /v2).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from service.engine.runtime import Runtime
from service.http.body import documented_body, json_response
from service.http.deps import CallerDep, RuntimeDep
from service.http.route_errors import V2_INDEX, V2_INFER, V2_METADATA, V2_MODEL_READY
from service.http.routes.lean import LeanRoute
from service.oip import decode as oip
from service.oip import stats
from service.oip.inference import OipInference
from service.oip.schemas import InferRequestDoc, InferResponseDoc, ModelMetadata, ServerMetadata
from service.protocol.errors import InvalidInput

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
# The infer routes carry the traffic: LeanRoutes (service/http/routes/lean.py), registered flat.
lean_router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=LeanRoute)


PROBE = {"response_class": Response, "responses": {200: {"description": '{"live": true}'}}}
HEALTH = {
    "response_class": Response,
    "responses": {
        200: {"description": '{"ready": true}'},
        400: {"description": '{"ready": false}'},
    },
}
MODEL_READY = {
    "response_class": Response,
    "responses": {
        200: {"description": '{"name": ..., "ready": true}'},
        400: {"description": '{"name": ..., "ready": false}'},
        **V2_MODEL_READY,
    },
}


# The infer routes first: the router tries routes in order, and these carry the traffic.
INFER = {
    "response_model": InferResponseDoc,
    "responses": V2_INFER,
    "openapi_extra": documented_body(InferRequestDoc),
}


@lean_router.post("/models/{name}/infer", summary="Inference (JSON or binary tensors)", **INFER)
async def infer(name: str, request: Request, caller: CallerDep) -> Response:
    runner: OipInference = request.app.state.oip
    entry = caller.registry.get(name)
    encoding = request.headers.get("content-encoding", "identity")
    if encoding != "identity":
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported: send the body as is")
    data = await request.body()
    header = request.headers.get(oip.INFERENCE_HEADER)
    limits = caller.runtime.limits
    decoded = await caller.runtime.decode(
        len(data), lambda: oip.decode_request(data, header, entry.inputs, limits, name)
    )
    routed = request.headers.get("x-session-id")
    if decoded.sequence is not None and routed not in (None, decoded.sequence.session_id):
        raise InvalidInput(
            f"X-Session-ID is {routed!r}, but {decoded.sequence.describe()} is session "
            f"{decoded.sequence.session_id!r}: behind the consistent-hash proxy, send that id "
            "as X-Session-ID (the proxy routes by it)"
        )
    y, parameters = await runner.infer(caller.owner, entry, decoded)
    body, headers, media_type = oip.encode_response(name, decoded, y, parameters)
    return Response(body, headers=headers, media_type=media_type)


@lean_router.post(
    "/models/{name}/versions/{version}/infer", summary="Inference of a version", **INFER
)
async def version_infer(name: str, version: str, request: Request, caller: CallerDep) -> Response:
    oip.model_entry(caller.registry, name, version)
    return await infer(name, request, caller)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> Response:
    return json_response(
        {"name": "tcnserve", "version": "0.1.0", "extensions": list(oip.EXTENSIONS)}
    )


@router.get("/health/live", summary="Liveness: 200 while the process runs", **PROBE)
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Readiness: 200 once every model is warmed", **HEALTH)
async def ready(runtime: RuntimeDep) -> Response:
    ready = runtime.ready
    return json_response({"ready": ready}, 200 if ready else 400)


@router.get("/models/stats", summary="Statistics of every model (Triton's extension)",
            responses=V2_INDEX)  # fmt: skip
async def all_stats(caller: CallerDep) -> Response:
    names = [entry.name for entry in caller.registry.entries()]
    return await _stats(caller.runtime, names)


@router.get(
    "/models/{name}/stats", summary="Statistics of one model (Triton's extension)",
    responses=V2_METADATA,
)  # fmt: skip
async def model_stats(name: str, caller: CallerDep) -> Response:
    caller.registry.get(name)  # an unknown model is a 404
    return await _stats(caller.runtime, [name])


@router.get(
    "/models/{name}/versions/{version}/stats", summary="Statistics of a model's version",
    responses=V2_METADATA,
)  # fmt: skip
async def version_stats(name: str, version: str, caller: CallerDep) -> Response:
    oip.model_entry(caller.registry, name, version)
    return await _stats(caller.runtime, [name])


async def _stats(runtime: Runtime, names: list[str]) -> Response:
    page = await runtime.render_metrics()
    return json_response(await asyncio.to_thread(stats.model_stats, page, names, oip.VERSION))


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    summary="Model metadata: its input and output tensors",
    responses=V2_METADATA,
)
async def model_metadata(name: str, caller: CallerDep) -> Response:
    entry = caller.registry.get(name)
    return json_response(oip.model_metadata(name, entry.inputs, entry.config.output_size))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    summary="Model metadata of a version (every model has version 1)",
    responses=V2_METADATA,
)
async def version_metadata(name: str, version: str, caller: CallerDep) -> Response:
    oip.model_entry(caller.registry, name, version)
    return await model_metadata(name, caller)


@router.get("/models/{name}/ready", summary="Model readiness", **MODEL_READY)
async def model_ready(name: str, runtime: RuntimeDep) -> Response:
    entry = runtime.registry.get(name)
    ready = entry.ready and not runtime.draining
    return json_response({"name": name, "ready": ready}, 200 if ready else 400)


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness", **MODEL_READY)
async def version_ready(name: str, version: str, runtime: RuntimeDep) -> Response:
    oip.model_entry(runtime.registry, name, version)
    return await model_ready(name, runtime)


@router.get(
    "/models/{name}/config",
    summary="Model configuration, as Triton's JSON model config (for perf_analyzer)",
    responses=V2_METADATA,
)
async def model_config(name: str, caller: CallerDep) -> Response:
    entry = caller.registry.get(name)
    settings = caller.runtime.settings
    return json_response(
        oip.model_config(
            name,
            entry.inputs,
            entry.config.output_size,
            settings.max_sequences_per_request,
            settings.session_ttl_s,
        )
    )


@router.get(
    "/models/{name}/versions/{version}/config",
    summary="Model configuration of a version",
    responses=V2_METADATA,
)
async def version_config(name: str, version: str, caller: CallerDep) -> Response:
    oip.model_entry(caller.registry, name, version)
    return await model_config(name, caller)


@router.get(
    "/models", summary="The served models (name, versions, platform, readiness)", responses=V2_INDEX
)
async def list_models(caller: CallerDep) -> Response:
    return json_response({"models": oip.model_index(caller.registry, caller.runtime.draining)})


@router.post("/repository/index", summary="Triton's model repository index", responses=V2_INDEX)
async def repository_index(caller: CallerDep) -> Response:
    return json_response(oip.repository_index(caller.registry, caller.runtime.draining))
