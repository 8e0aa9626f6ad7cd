"""WS /v1/streams: one connection multiplexing pushes to many sessions (a gateway's socket).

Each message is a batch of pushes to distinct sessions, answered by one message with a result per
push, in order: text frames hold the JSON of POST /v1/steps (`{"steps": [...]}` answered by
`{"results": [...]}`), binary frames the multi-session framing of service/wire.py. Each push has
the semantics of a single push and fails alone. The sessions are created over HTTP (or by
`WS /v1/stream?keep=true`) and stay when the socket closes. Messages are handled one at a time,
as on the single-session sockets.
"""

from __future__ import annotations

import contextlib
import json
import logging

import msgspec
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from service import inputs, many_steps
from service.error_codes import CLOSE_INTERNAL_ERROR
from service.errors import InvalidInput, ServiceError
from service.http_errors import error_message, websocket_close_code
from service.routes.steps import json_result
from service.routes.stream import close_for_error
from service.runtime import Runtime
from service.wire import FrameAnswer, FrameError, decode_pushes, encode_answers

logger = logging.getLogger(__name__)
router = APIRouter(tags=["streaming"])
_encode = msgspec.json.Encoder().encode


@router.websocket("/v1/streams")
async def multiplexed_stream(websocket: WebSocket) -> None:
    """Pushes to many sessions per message (query: token)."""
    runtime: Runtime = websocket.app.state.runtime
    await websocket.accept()
    headers = websocket.headers
    try:
        owner = runtime.api_keys.owner(
            headers.get("authorization"),
            headers.get("x-api-key") or websocket.query_params.get("token"),
        )
        runtime.check_ready()
    except ServiceError as e:
        await close_for_error(websocket, e)
        return
    metrics = runtime.metrics
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
                    data = message["bytes"]
                    items = _binary_items(data)
                    outcomes = await many_steps.push_items(runtime, owner, items, len(data))
                    await websocket.send_bytes(encode_answers([_frame(o) for o in outcomes]))
                else:
                    text = (message.get("text") or "").encode()
                    body = inputs.decode_body(text, inputs.ManyStepsBody, "message")
                    items = many_steps.json_items(body.steps)
                    outcomes = await many_steps.push_items(runtime, owner, items, len(text))
                    answer = {"results": [json_result(o) for o in outcomes]}
                    await websocket.send_text(_encode(answer).decode())
                metrics.websocket_messages.labels(kind, "ok").inc()
            except ServiceError as e:  # the message as a whole (it did not parse, too many)
                metrics.websocket_messages.labels(kind, e.code).inc()
                if websocket_close_code(e) is not None:
                    await close_for_error(websocket, e)
                    return
                await websocket.send_text(_encode(error_message(e)).decode())
    except WebSocketDisconnect:
        return
    except Exception:
        logger.exception("multiplexed websocket stream failed")
        with contextlib.suppress(Exception):
            await websocket.close(CLOSE_INTERNAL_ERROR, "internal server error")
    finally:
        metrics.websocket_connections.dec()


def _binary_items(data: bytes) -> list[many_steps.Item]:
    try:
        pushes = decode_pushes(data)
    except FrameError as e:
        raise InvalidInput(f"binary frame: {e}") from None
    return [
        many_steps.Item(
            push.session_id,
            lambda spec, rows=push.rows: inputs.check_array(rows, spec, "inputs"),
            lambda offset=push.offset: _offset(offset),
        )
        for push in pushes
    ]


def _offset(offset: int | None) -> int | None:
    if offset is not None and not 0 <= offset <= inputs.MAX_POSITION:
        raise InvalidInput(f"offset must be -1 (none) or in [0, {inputs.MAX_POSITION}]")
    return offset


def _frame(outcome: many_steps.Outcome) -> FrameAnswer:
    if outcome.error is not None:
        body = json.dumps(error_message(outcome.error)).encode()
        return FrameAnswer(outcome.session_id, -1, None, body)
    return FrameAnswer(outcome.session_id, outcome.position, outcome.outputs, None)
