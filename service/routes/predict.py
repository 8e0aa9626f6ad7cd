"""POST /v1/models/{name}/predict: whole sequences through TCN.forward, on the model's worker."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import CallerDep
from service.errors import TooManySequences
from service.http_errors import ERROR_RESPONSES
from service.inputs import check_timesteps, decode_rows
from service.schemas import PredictRequest, PredictResponse

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


@router.post("/{name}/predict", response_model=PredictResponse, summary="Run whole sequences")
async def predict(name: str, body: PredictRequest, caller: CallerDep) -> PredictResponse:
    entry = caller.registry.get(name)
    settings = caller.runtime.settings
    if len(body.inputs) > settings.max_sequences_per_request:
        raise TooManySequences(
            f"the request has {len(body.inputs)} sequences; at most "
            f"{settings.max_sequences_per_request} per request (max_sequences_per_request)"
        )
    check_timesteps(sum(len(seq) for seq in body.inputs), settings.max_timesteps_per_request)
    sequences = [
        decode_rows(seq, entry.config, entry.input_dtype, f"inputs[{i}]")
        for i, seq in enumerate(body.inputs)
    ]
    outputs = await entry.predict(sequences, last_only=body.outputs == "last")
    return PredictResponse(model=name, outputs=outputs)
