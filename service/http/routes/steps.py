"""POST /v1/steps: push rows to many sessions in one request (a gateway forwarding its streams).

Each item has exactly the semantics of POST /v1/sessions/{id}/steps (offsets, idempotent replay,
limits) and fails alone: the answer lists, in request order, either the item's outputs and
position or its error. The pushes are handed to the sessions concurrently, so the model worker
advances them together in one batched call per model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.http import many_steps, route_errors
from service.http.body import body_bytes, documented_body, json_response
from service.http.deps import CallerDep
from service.http.errors import error_message
from service.http.many_steps import push_items
from service.http.routes.lean import LeanRoute
from service.http.schemas import ManyStepsRequest, ManyStepsResponse
from service.models import inputs

router = APIRouter(prefix="/v1", tags=["sessions"], route_class=LeanRoute)


@router.post(
    "/steps",
    response_model=ManyStepsResponse,
    summary="Push rows to many sessions at once",
    responses=route_errors.PUSH_MANY,
    openapi_extra=documented_body(ManyStepsRequest),
)
async def push_many(request: Request, caller: CallerDep) -> Response:
    data = await body_bytes(request)
    body = await caller.runtime.decode(
        len(data),
        lambda: inputs.decode_body(data, inputs.ManyStepsBody, limits=caller.runtime.limits),
    )
    items = many_steps.json_items(body.steps)
    outcomes = await push_items(caller.runtime, caller.owner, items, len(data))
    return json_response({"results": [json_result(o) for o in outcomes]})


def json_result(outcome: many_steps.Outcome) -> dict[str, Any]:
    """An item's answer: outputs and position, or the body of a single push's error."""
    if outcome.error is not None:
        return {"session_id": outcome.session_id, **error_message(outcome.error)}
    return {
        "session_id": outcome.session_id,
        "outputs": outcome.outputs.tolist(),
        "position": outcome.position,
    }
