"""Streaming sessions: create, push rows (offsets make retries safe), inspect, reset, delete."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, Query, Request, Response, status

from service.http import route_errors
from service.http.body import body_bytes, documented_body, json_response
from service.http.deps import CallerDep
from service.http.routes.lean import LeanRoute
from service.http.schemas import (
    CreateSessionRequest,
    SessionCreated,
    SessionInfo,
    SessionList,
    SessionsDeleted,
    Snapshot,
    StepRequest,
    StepResponse,
)
from service.models import inputs
from service.protocol.errors import InvalidInput
from service.sessions.state import Session

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
# The hottest route, a LeanRoute (service/http/routes/lean.py), on a router of its own.
lean_router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=LeanRoute)


def _info(session: Session) -> SessionInfo:
    return SessionInfo(
        session_id=session.id,
        model=session.model,
        position=session.position,
        created_at=session.created_at,
        last_used_at=session.last_used_at,
        expires_at=session.expires_at,
        ttl_s=session.ttl_s,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionCreated,
    response_model_exclude_none=True,
    summary="Open a session, warmed by prefix rows or rebuilt from a snapshot",
    responses=route_errors.CREATE_SESSION,
    openapi_extra=documented_body(CreateSessionRequest),
)
async def create_session(
    request: Request,
    caller: CallerDep,
    x_session_id: Annotated[
        str | None,
        Header(
            alias="X-Session-ID",
            description="the session id to use (as a consistent-hash proxy routes by it)",
        ),
    ] = None,
) -> SessionCreated:
    caller.runtime.check_accepting()
    data = await body_bytes(request)
    limits = caller.runtime.limits
    body = await caller.runtime.decode(
        len(data), lambda: inputs.decode_body(data, inputs.CreateBody, limits=limits)
    )
    if inputs.given(body.prefix) and body.snapshot is not None:
        raise InvalidInput("give either prefix or snapshot, not both")
    if body.session_id and x_session_id and body.session_id != x_session_id:
        raise InvalidInput(
            "session_id in the body differs from the X-Session-ID header; behind a proxy, "
            "send the id you choose as X-Session-ID (the proxy routes by it)"
        )
    snapshot = body.snapshot
    if snapshot is not None and snapshot.model not in (None, body.model):
        raise InvalidInput(
            f"this snapshot is of model {snapshot.model!r}; it cannot rebuild a {body.model!r} "
            "session"
        )
    spec = caller.registry.get(body.model).inputs

    def decode_rows() -> tuple:
        prefix = None
        embedding = inputs.embeddings(body.embedding, spec, "embedding", one=True)
        if inputs.given(body.prefix):
            prefix = inputs.rows(body.prefix, spec, "prefix", allow_empty=True)
        if snapshot is None:
            return prefix, None, embedding
        rows = inputs.rows(snapshot.inputs, spec, "snapshot.inputs", allow_empty=True)
        kept = inputs.embeddings(snapshot.embedding, spec, "snapshot.embedding", one=True)
        if embedding is not None and kept is not None and embedding != kept:
            raise InvalidInput("embedding differs from the snapshot's: give one of them")
        return prefix, (snapshot.position, rows), embedding if embedding is not None else kept

    prefix, restore, embedding = await caller.runtime.decode(len(data), decode_rows)
    session, outputs = await caller.sessions.create(
        caller.owner,
        body.model,
        body.session_id or x_session_id,
        body.ttl_s,
        prefix,
        restore,
        embedding=embedding,
    )
    created = {
        "session_id": session.id,
        "model": session.model,
        "position": session.position,
        "expires_at": session.expires_at,
    }
    if prefix is not None:
        created["outputs"] = outputs.tolist()
    return json_response(created, status.HTTP_201_CREATED)


@lean_router.post(
    "/{session_id}/steps",
    response_model=StepResponse,
    summary="Push rows",
    responses=route_errors.PUSH,
    openapi_extra=documented_body(StepRequest),
)
async def push_steps(session_id: str, request: Request, caller: CallerDep) -> Response:
    # Resolved once: the rows are decoded against the handle, and the push takes it.
    handle = await caller.sessions.resolve(caller.owner, session_id)
    data = await body_bytes(request)

    def decode() -> tuple[int | None, object]:
        body = inputs.decode_body(data, inputs.StepBody, limits=caller.runtime.limits)
        return body.offset, inputs.rows(body.inputs, handle.spec, "inputs")

    offset, x = await caller.runtime.decode(len(data), decode)
    result = await caller.sessions.push(handle, x, offset)
    return json_response({"outputs": result.outputs.tolist(), "position": result.position})


MAX_PAGE = 1000  # sessions in one GET /v1/sessions page


@router.get(
    "",
    response_model=SessionList,
    summary="List your sessions (held by this replica), by id, a page at a time",
    responses=route_errors.LIST_SESSIONS,
)
async def list_sessions(
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="sessions per page")] = 100,
    after: Annotated[str | None, Query(description="the previous page's `next`")] = None,
    model: Annotated[str | None, Query(description="only this model's sessions")] = None,
) -> Response:
    page, after = await caller.sessions.list(caller.owner, limit, after, model)
    now = caller.runtime.clock()
    listed = [{**_info(s).model_dump(), "idle_s": max(0.0, now - s.last_used_at)} for s in page]
    return json_response({"sessions": listed, "next": after})


@router.delete(
    "",
    response_model=SessionsDeleted,
    summary="Close all your sessions (held by this replica), or all of one model's",
    responses=route_errors.LIST_SESSIONS,
)
async def delete_sessions(
    caller: CallerDep,
    model: Annotated[str | None, Query(description="only this model's sessions")] = None,
) -> Response:
    return json_response({"deleted": await caller.sessions.delete_all(caller.owner, model)})


@router.get(
    "/{session_id}",
    response_model=SessionInfo,
    summary="Describe a session",
    responses=route_errors.SESSION_OPERATION,
)
async def get_session(session_id: str, caller: CallerDep) -> SessionInfo:
    return _info(await caller.sessions.get(caller.owner, session_id))


@router.get(
    "/{session_id}/snapshot",
    response_model=Snapshot,
    response_model_exclude_none=True,  # `embedding` only for a conditioned model's session
    summary="The position and last inputs that rebuild this session anywhere",
    responses=route_errors.SESSION_OPERATION,
)
async def get_snapshot(session_id: str, caller: CallerDep) -> Snapshot:
    session, rows = await caller.sessions.snapshot(caller.owner, session_id)
    inputs = rows[:, None].tolist() if rows.ndim == 1 else rows.tolist()  # token ids: [[id]]
    embedding = session.embedding
    return Snapshot(
        session_id=session.id,
        model=session.model,
        position=session.position,
        inputs=inputs,
        # an array in-process, a list across the engine boundary: one JSON list either way
        embedding=None if embedding is None else np.asarray(embedding, np.float64).tolist(),
    )


@router.post(
    "/{session_id}/reset",
    response_model=SessionInfo,
    summary="Back to position 0",
    responses=route_errors.SESSION_OPERATION,
)
async def reset_session(session_id: str, caller: CallerDep) -> SessionInfo:
    return _info(await caller.sessions.reset(caller.owner, session_id))


@router.delete(
    "/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Close a session",
    responses=route_errors.SESSION_OPERATION,
)
async def delete_session(session_id: str, caller: CallerDep) -> Response:
    await caller.sessions.delete(caller.owner, session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
