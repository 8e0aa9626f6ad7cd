"""WebSocket streaming: one message per push, answered in order, as JSON or binary frames.

The handlers only decode frames, hand pushes to the SessionManager (so they join the same
micro-batches as HTTP pushes) and encode the answers; errors are mapped in http_errors.py.
Messages of one connection are handled one at a time: the next is read after the answer is
sent, so a client that does not read stops being read (uvicorn queues at most ws_max_queue
messages per connection) and server memory stays bounded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

import numpy as np
from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from service.errors import InvalidInput, ServiceError
from service.http_errors import (
    CLOSE_BAD_REQUEST,
    CLOSE_INTERNAL_ERROR,
    validation_message,
    websocket_close_code,
    websocket_error,
)
from service.runtime import Runtime
from service.schemas import SessionCreated, StepRequest
from service.session_state import Session
from service.wire import FrameError, decode_frame, encode_frame

logger = logging.getLogger(__name__)
router = APIRouter(tags=["streaming"])
Framing = Literal["none", "offset"]


@router.websocket("/v1/sessions/{session_id}/stream")
async def attach_stream(
    websocket: WebSocket,
    session_id: str,
    framing: Framing = "none",
    token: str | None = Query(None, description="API key, for clients that cannot set headers"),
) -> None:
    """Push to an existing session over a WebSocket."""

    async def find(runtime: Runtime, owner: str) -> Session:
        runtime.check_ready()
        return await runtime.sessions.get(owner, session_id)

    started = await _accept(websocket, token, find)
    if started is not None:
        runtime, owner, session = started
        await _serve(websocket, runtime, owner, session.id, session.model, framing == "offset")


@router.websocket("/v1/stream")
async def open_stream(
    websocket: WebSocket,
    model: str = "default",
    keep: bool = Query(False, description="keep the session after the socket closes"),
    session_id: str | None = None,
    ttl_s: float | None = None,
    framing: Framing = "none",
    token: str | None = Query(None, description="API key, for clients that cannot set headers"),
) -> None:
    """Open a session bound to this WebSocket; the first message describes it."""

    async def create(runtime: Runtime, owner: str) -> Session:
        runtime.check_accepting()
        # Behind the consistent-hash proxy the id comes as X-Session-ID: the key it routed by.
        header_id = websocket.headers.get("x-session-id")
        if session_id and header_id and session_id != header_id:
            raise InvalidInput("the session_id parameter differs from the X-Session-ID header")
        session, _ = await runtime.sessions.create(owner, model, session_id or header_id, ttl_s)
        return session

    started = await _accept(websocket, token, create)
    if started is None:
        return
    runtime, owner, session = started
    try:
        created = SessionCreated(
            session_id=session.id,
            model=session.model,
            position=session.position,
            expires_at=session.expires_at,
        )
        await websocket.send_text(created.model_dump_json(exclude_none=True))
        await _serve(websocket, runtime, owner, session.id, session.model, framing == "offset")
    finally:
        if not keep:
            with contextlib.suppress(ServiceError):
                await runtime.sessions.delete(owner, session.id)


async def _accept(
    websocket: WebSocket,
    token: str | None,
    start: Callable[[Runtime, str], Awaitable[Session]],
) -> tuple[Runtime, str, Session] | None:
    """Accept, authenticate (header, else the token parameter) and find or open the session;
    on an error, close with its code and return None."""
    runtime: Runtime = websocket.app.state.runtime
    await websocket.accept()
    headers = websocket.headers
    try:
        owner = runtime.api_keys.owner(
            headers.get("authorization"), headers.get("x-api-key") or token
        )
        return runtime, owner, await start(runtime, owner)
    except ServiceError as e:
        await _close(websocket, e)
        return None


async def _serve(
    websocket: WebSocket,
    runtime: Runtime,
    owner: str,
    session_id: str,
    model: str,
    offsets: bool,
) -> None:
    metrics = runtime.metrics
    width = runtime.registry.get(model).config.in_channels
    metrics.websocket_connections.inc()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            binary = message.get("bytes") is not None
            kind = "binary" if binary else "text"
            try:
                if binary:
                    offset, rows = _decode_binary(message["bytes"], width, offsets)
                    result = await runtime.sessions.push_array(owner, session_id, rows, offset)
                    header = result.position if offsets else None
                    await websocket.send_bytes(encode_frame(result.outputs, header))
                else:
                    body = _decode_text(message.get("text") or "")
                    result = await runtime.sessions.push(
                        owner, session_id, body.inputs, body.offset
                    )
                    await websocket.send_json(
                        {"outputs": result.outputs.tolist(), "position": result.position}
                    )
                metrics.websocket_messages.labels(kind, "ok").inc()
            except ServiceError as e:
                metrics.websocket_messages.labels(kind, e.code).inc()
                if websocket_close_code(e) is not None:
                    await _close(websocket, e)
                    return
                await websocket.send_json(websocket_error(e))
    except WebSocketDisconnect:
        return
    except Exception:
        logger.exception("websocket stream of session %s failed", session_id)
        with contextlib.suppress(Exception):
            await websocket.close(CLOSE_INTERNAL_ERROR, "internal server error")
    finally:
        metrics.websocket_connections.dec()


def _decode_binary(data: bytes, width: int, offsets: bool) -> tuple[int | None, np.ndarray]:
    try:
        offset, rows = decode_frame(data, width, offsets)
    except FrameError as e:
        raise InvalidInput(str(e)) from None
    if offset is not None and offset < 0:
        raise InvalidInput(f"the offset header must be >= 0, got {offset}")
    return offset, rows


def _decode_text(text: str) -> StepRequest:
    try:
        return StepRequest.model_validate_json(text)
    except ValidationError as e:
        raise InvalidInput(validation_message(e)) from None


async def _close(websocket: WebSocket, error: ServiceError) -> None:
    code = websocket_close_code(error) or CLOSE_BAD_REQUEST
    # A close reason is at most 123 bytes.
    reason = error.message.encode()[:120].decode(errors="ignore")
    with contextlib.suppress(RuntimeError):  # the client may be gone already
        await websocket.close(code, reason)
