"""POST /v1/models/{name}/predict: whole sequences through TCN.forward, on the model's worker."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.http import route_errors
from service.http.body import body_bytes, documented_body, json_response
from service.http.deps import CallerDep
from service.http.routes.lean import LeanRoute
from service.http.schemas import PredictRequest, PredictResponse
from service.models import inputs
from service.protocol.errors import TooManySequences
from service.protocol.limits import check_timesteps

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=LeanRoute)


@router.post(
    "/{name}/predict",
    response_model=PredictResponse,
    summary="Run whole sequences",
    responses=route_errors.PREDICT,
    openapi_extra=documented_body(PredictRequest),
)
async def predict(name: str, request: Request, caller: CallerDep) -> Response:
    entry = caller.registry.get(name)
    settings = caller.runtime.settings
    data = await body_bytes(request)
    spec = entry.inputs

    def decode() -> tuple[inputs.PredictBody, list, list | None]:
        body = inputs.decode_body(data, inputs.PredictBody, limits=caller.runtime.limits)
        embeddings = inputs.embeddings(body.embeddings, spec, "embeddings", one=False)
        return body, inputs.sequences(body.inputs, spec, "inputs"), embeddings

    body, sequences, embeddings = await caller.runtime.decode(len(data), decode)
    if len(sequences) > settings.max_sequences_per_request:
        raise TooManySequences(
            f"the request has {len(sequences)} sequences; at most "
            f"{settings.max_sequences_per_request} per request (max_sequences_per_request)"
        )
    check_timesteps(sum(len(s) for s in sequences), settings.max_timesteps_per_request)
    outputs = await entry.predict(sequences, body.outputs == "last", embeddings)
    return json_response({"model": name, "outputs": [y.tolist() for y in outputs]})
