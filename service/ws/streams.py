"""WS /v1/streams: one connection multiplexing pushes to many sessions (a gateway's socket).

Each message is a batch of pushes to distinct sessions, answered by one message with a result per
push, in order: text frames hold the JSON of POST /v1/steps (`{"steps": [...]}` answered by
`{"results": [...]}`), binary frames the multi-session framing of service/protocol/wire.py. Each
push has
the semantics of a single push and fails alone. The sessions are created over HTTP (or by
`WS /v1/stream?keep=true`) and stay when the socket closes. Messages are handled one at a time,
as on the single-session sockets.
"""

from __future__ import annotations

import json

import msgspec
from fastapi import APIRouter, WebSocket
from starlette.types import Message

from service.engine.runtime import Runtime
from service.http import many_steps
from service.http.errors import error_message
from service.http.routes.steps import json_result
from service.models import inputs
from service.protocol.errors import InvalidInput, ServiceError
from service.protocol.wire import FrameAnswer, FrameError, decode_pushes, encode_answers
from service.ws.stream import answer_messages, close_for_error

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
        await runtime.acquire_stream(owner)
    except ServiceError as e:
        await close_for_error(websocket, e)
        return

    async def answer(message: Message) -> None:
        limit = runtime.settings.max_sequences_per_request
        if message.get("bytes") is not None:
            data = message["bytes"]
            # Large frames are parsed off the event loop, and a frame of too many pushes is
            # refused before they are read.
            items = await runtime.decode(len(data), lambda: _binary_items(data, limit))
            outcomes = await many_steps.push_items(runtime, owner, items, len(data))
            await websocket.send_bytes(encode_answers([_frame(o) for o in outcomes]))
        else:
            text = (message.get("text") or "").encode()
            body = await runtime.decode(
                len(text),
                lambda: inputs.decode_body(
                    text, inputs.ManyStepsBody, "message", limits=runtime.limits
                ),
            )
            items = many_steps.json_items(body.steps)
            outcomes = await many_steps.push_items(runtime, owner, items, len(text))
            results = {"results": [json_result(o) for o in outcomes]}
            await websocket.send_text(_encode(results).decode())

    try:
        await answer_messages(websocket, runtime, answer, "a multiplexed stream")
    finally:
        await runtime.release_stream(owner)


def _binary_items(data: bytes, limit: int) -> list[many_steps.Item]:
    try:
        pushes = decode_pushes(data, max_items=limit)
    except FrameError as e:
        raise InvalidInput(f"binary frame: {e}") from None
    return [many_steps.Item(push.session_id, push.rows, push.offset) for push in pushes]


def _frame(outcome: many_steps.Outcome) -> FrameAnswer:
    if outcome.error is not None:
        body = json.dumps(error_message(outcome.error)).encode()
        return FrameAnswer(outcome.session_id, -1, None, body)
    return FrameAnswer(outcome.session_id, outcome.position, outcome.outputs, None)
