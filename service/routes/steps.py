"""POST /v1/steps: push rows to many sessions in one request (a gateway forwarding its streams).

Each item has exactly the semantics of POST /v1/sessions/{id}/steps (offsets, idempotent replay,
limits) and fails alone: the answer lists, in request order, either the item's outputs and
position or its error. The pushes are handed to the sessions concurrently, so the model worker
advances them together in one batched call per model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service import inputs
from service.deps import Caller, CallerDep
from service.errors import InvalidInput, ServiceError, TooManySequences
from service.http_errors import ERROR_RESPONSES, error_message
from service.request_body import body_bytes, documented_body, json_response
from service.schemas import ManyStepsRequest, ManyStepsResponse

router = APIRouter(prefix="/v1", tags=["sessions"], responses=ERROR_RESPONSES)


@router.post(
    "/steps",
    response_model=ManyStepsResponse,
    summary="Push rows to many sessions at once",
    openapi_extra=documented_body(ManyStepsRequest),
)
async def push_many(request: Request, caller: CallerDep) -> Response:
    settings = caller.runtime.settings
    data = await body_bytes(request)
    body = await caller.runtime.decode(
        len(data), lambda: inputs.decode_body(data, inputs.ManyStepsBody)
    )
    if len(body.steps) > settings.max_sequences_per_request:
        raise TooManySequences(
            f"the request has {len(body.steps)} steps; at most "
            f"{settings.max_sequences_per_request} per request (max_sequences_per_request)"
        )
    if not body.steps:
        raise InvalidInput("steps: give at least one item")
    decoded = await caller.runtime.decode(len(data), lambda: _decode_items(caller, body.steps))
    pushes = [(i, item) for i, item in enumerate(decoded) if not isinstance(item, ServiceError)]
    outcomes = await caller.sessions.push_many(caller.owner, [item for _, item in pushes])
    results: list[Any] = list(decoded)
    for (i, _), outcome in zip(pushes, outcomes, strict=True):
        results[i] = outcome
    answers = []
    for item, result in zip(body.steps, results, strict=True):
        if isinstance(result, ServiceError):
            answers.append({"session_id": item.session_id, **error_message(result)})
        else:
            answers.append(
                {
                    "session_id": item.session_id,
                    "outputs": result.outputs.tolist(),
                    "position": result.position,
                }
            )
    return json_response({"results": answers})


def _decode_items(
    caller: Caller, items: list[inputs.ManyStep]
) -> list[tuple[str, Any, int | None] | ServiceError]:
    """Per item: (session id, rows decoded for its session's model, offset), or its error."""
    seen: set[str] = set()
    out: list[tuple[str, Any, int | None] | ServiceError] = []
    for item in items:
        try:
            if item.session_id in seen:
                raise InvalidInput(
                    f"session {item.session_id!r} is named more than once in this request; "
                    "only its first item is applied (send its rows in one item, or in order "
                    "over several requests)"
                )
            seen.add(item.session_id)
            model = caller.sessions.model_of(caller.owner, item.session_id)
            x = inputs.rows(item.inputs, caller.registry.get(model).inputs, "inputs")
            out.append((item.session_id, x, inputs.offset(item.offset)))
        except ServiceError as e:
            out.append(e)
    return out
