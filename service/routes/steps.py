"""POST /v1/steps: push rows to many sessions in one request (a gateway forwarding its streams).

Each item has exactly the semantics of POST /v1/sessions/{id}/steps (offsets, idempotent replay,
limits) and fails alone: the answer lists, in request order, either the item's outputs and
position or its error. The pushes are handed to the sessions concurrently, so the model worker
advances them together in one batched call per model.
"""

from __future__ import annotations

import asyncio
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
    seen: set[str] = set()
    firsts = []
    for item in body.steps:
        firsts.append(item.session_id not in seen)
        seen.add(item.session_id)
    results = await asyncio.gather(
        *(_push(caller, item, first) for item, first in zip(body.steps, firsts, strict=True))
    )
    return json_response({"results": results})


async def _push(caller: Caller, item: inputs.ManyStep, first: bool) -> dict[str, Any]:
    """One item: its outputs and position, or its error (the body of a single push's error)."""
    try:
        if not first:
            raise InvalidInput(
                f"session {item.session_id!r} is named more than once in this request; only "
                "its first item is applied (send its rows in one item, or in order over "
                "several requests)"
            )
        session = await caller.sessions.get(caller.owner, item.session_id)
        spec = caller.registry.get(session.model).inputs
        x = inputs.rows(item.inputs, spec, "inputs")
        offset = inputs.offset(item.offset)
        result = await caller.sessions.push(caller.owner, item.session_id, x, offset)
    except ServiceError as e:
        return {"session_id": item.session_id, **error_message(e)}
    return {
        "session_id": item.session_id,
        "outputs": result.outputs.tolist(),
        "position": result.position,
    }
