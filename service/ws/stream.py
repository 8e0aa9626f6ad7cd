"""WebSocket streaming: one message per push, answered in order, as JSON or binary frames.

The handlers only decode frames, hand pushes to the SessionManager (so they join the same
micro-batches as HTTP pushes) and encode the answers; errors are mapped in http_errors.py.
Messages of one connection are handled one at a time: the next is read after the answer is
sent, so a client that does not read stops being read (uvicorn's sans-I/O protocol pauses
reading after each message until it is taken), and a message being answered is held against
the request bodies' shared budget, so server memory stays bounded.

Under `tcnserve serve` a binary push to a free session takes the direct path
(`_DirectPushes`, service/ws/protocol.py): started in the callback that parsed the message and
answered in the callback that records it. Anything else (a text message, a session busy or
gone, a bad frame, a full budget) takes the ASGI path below, which answers it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.types import Message

from service.engine.runtime import Runtime
from service.http.errors import error_message, websocket_close_code
from service.models import inputs
from service.protocol.error_codes import CLOSE_BAD_REQUEST, CLOSE_INTERNAL_ERROR
from service.protocol.errors import InvalidInput, InvalidQuery, Overloaded, ServiceError
from service.protocol.limits import RequestLimits
from service.protocol.wire import FrameError, decode_frame, encode_frame
from service.sessions.state import PushResult, Session, SessionHandle
from service.ws.protocol import DIRECT_BINARY, DirectLink

logger = logging.getLogger(__name__)
router = APIRouter(tags=["streaming"])
FRAMINGS = ("none", "offset")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class _Params:
    """The query parameters of a stream, validated after the handshake so that a bad one
    closes the socket with 1008 and a message instead of failing the upgrade."""

    framing: str
    token: str | None
    model: str
    keep: bool
    session_id: str | None
    ttl_s: float | None

    @classmethod
    def read(cls, websocket: WebSocket) -> _Params:
        q = websocket.query_params
        framing = q.get("framing", "none")
        if framing not in FRAMINGS:
            raise InvalidQuery(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
        keep = q.get("keep", "false").lower()
        if keep not in ("true", "false", "1", "0"):
            raise InvalidQuery(f"keep must be true or false, got {keep!r}")
        ttl_s = None
        if "ttl_s" in q:
            try:
                ttl_s = float(q["ttl_s"])
            except ValueError:
                raise InvalidQuery(f"ttl_s must be a number, got {q['ttl_s']!r}") from None
        return cls(
            framing, q.get("token"), q.get("model", "default"), keep in ("true", "1"),
            q.get("session_id"), ttl_s,
        )  # fmt: skip


@router.websocket("/v1/sessions/{session_id}/stream")
async def attach_stream(websocket: WebSocket, session_id: str) -> None:
    """Push to an existing session over a WebSocket (query: framing, token)."""

    async def find(runtime: Runtime, owner: str, params: _Params) -> Session:
        runtime.check_ready()
        return await runtime.sessions.get(owner, session_id)

    started = await _accept(websocket, find)
    if started is not None:
        runtime, owner, session, params = started
        try:
            await _serve(websocket, runtime, owner, session, params.framing == "offset")
        finally:
            await runtime.release_stream(owner)


@router.websocket("/v1/stream")
async def open_stream(websocket: WebSocket) -> None:
    """Open a session bound to this WebSocket; the first message describes it (query: model,
    keep, session_id, ttl_s, framing, token)."""

    async def create(runtime: Runtime, owner: str, params: _Params) -> Session:
        runtime.check_accepting()
        # Behind the consistent-hash proxy the id comes as X-Session-ID: the key it routed by.
        header_id = websocket.headers.get("x-session-id")
        if params.session_id and header_id and params.session_id != header_id:
            raise InvalidInput("the session_id parameter differs from the X-Session-ID header")
        session, _ = await runtime.sessions.create(
            owner, params.model, params.session_id or header_id, params.ttl_s, bound=not params.keep
        )
        return session

    started = await _accept(websocket, create)
    if started is None:
        return
    runtime, owner, session, params = started
    try:
        created = {
            "session_id": session.id,
            "model": session.model,
            "position": session.position,
            "expires_at": session.expires_at,
        }
        await websocket.send_text(_encode(created).decode())
        await _serve(websocket, runtime, owner, session, params.framing == "offset")
    finally:  # without keep, this very session: never a newer one that took its id
        await runtime.end_stream(owner, None if params.keep else session)


async def _accept(
    websocket: WebSocket,
    start: Callable[[Runtime, str, _Params], Awaitable[Session]],
) -> tuple[Runtime, str, Session, _Params] | None:
    """Accept, read the parameters, authenticate (header, else the token parameter), count the
    stream against its key (the caller releases it) and find or open the session; on an error,
    close with its code and return None."""
    runtime: Runtime = websocket.app.state.runtime
    await websocket.accept()
    headers = websocket.headers
    try:
        params = _Params.read(websocket)
        owner = runtime.api_keys.owner(
            headers.get("authorization"), headers.get("x-api-key") or params.token
        )
        await runtime.acquire_stream(owner)
    except ServiceError as e:
        await close_for_error(websocket, e)
        return None
    try:
        return runtime, owner, await start(runtime, owner, params), params
    except ServiceError as e:
        await runtime.release_stream(owner)
        await close_for_error(websocket, e)
        return None
    except BaseException:  # a bug, a cancellation: the stream is not held either way
        await runtime.release_stream(owner)
        raise


async def _serve(
    websocket: WebSocket, runtime: Runtime, owner: str, session: Session, offsets: bool
) -> None:
    session_id = session.id
    handle = runtime.sessions.handle(session)  # resolved once, for the stream's life
    spec = handle.spec

    async def answer(message: Message) -> None:
        if message.get("bytes") is not None:
            offset, rows = _decode_binary(message["bytes"], spec, offsets)
            result = await runtime.sessions.push(handle, rows, offset)
            header = result.position if offsets else None
            await websocket.send_bytes(encode_frame(result.outputs, header))
        else:
            text = message.get("text") or ""
            offset, rows = await runtime.decode(
                len(text), functools.partial(_decode_text, text, spec, runtime.limits)
            )
            result = await runtime.sessions.push(handle, rows, offset)
            body = {"outputs": result.outputs.tolist(), "position": result.position}
            await websocket.send_text(_encode(body).decode())

    what = f"session {session_id}"
    attach = websocket.scope.get("extensions", {}).get(DIRECT_BINARY)
    direct = None if attach is None else _DirectPushes(runtime, handle, offsets, what)
    if direct is not None:
        direct.link = attach["attach"](direct)
    try:
        await answer_messages(websocket, runtime, answer, what)
    finally:
        if direct is not None:
            direct.link.detach()


class _DirectPushes:
    """A stream's binary pushes on the protocol's direct path: decoded in the callback that
    parsed the message, started on a free session (`start_push`) and answered from the callback
    that records the push, with no task and no future. What it cannot start at once is declined
    before anything changes (its session busy, moved or expired, a bad frame, the bodies'
    budget full: the ASGI path then answers it, waiting or with its error); an error of a push
    it started is answered here as that path would answer it."""

    def __init__(self, runtime: Runtime, handle: SessionHandle, offsets: bool, what: str):
        self.link: DirectLink  # set once attached
        self._sessions = runtime.sessions
        self._handle = handle
        self._spec = handle.spec
        self._offsets = offsets
        self._budget = runtime.inflight
        self._messages = runtime.metrics.websocket_messages
        self._ok = self._messages.labels("binary", "ok")
        self._what = what
        self._held = 0  # the size of the message being answered, held against the budget
        self._reply = self._replied  # one bound method for every push

    def __call__(self, data: bytes) -> bool:
        size = len(data)
        if not self._budget.take(size):
            return False
        self._held = size  # before the start: a replay is answered within it
        try:
            offset, rows = _decode_binary(data, self._spec, self._offsets)
            started = self._sessions.start_push(self._handle, rows, offset, self._reply)
        except ServiceError:  # the ASGI path raises it again and answers it
            started = False
        except BaseException:
            self._budget.release(size)
            raise
        if not started:
            self._budget.release(size)
        return started

    def _replied(self, result: PushResult | None, error: BaseException | None) -> None:
        self._budget.release(self._held)
        try:
            if result is not None:
                header = result.position if self._offsets else None
                self.link.send_bytes(encode_frame(result.outputs, header))
                self._ok.inc()
                return
            raise error  # type: ignore[misc]
        except ServiceError as e:
            self._messages.labels("binary", e.code).inc()
            if websocket_close_code(e) is not None:
                self.link.close(*_close_args(e))
            else:
                self.link.send_text(_encode(error_message(e)).decode())
        except Exception:
            logger.exception("websocket stream of %s failed", self._what)
            self.link.close(CLOSE_INTERNAL_ERROR, "internal server error")


async def answer_messages(
    websocket: WebSocket,
    runtime: Runtime,
    answer: Callable[[Message], Awaitable[None]],
    what: str,
) -> None:
    """The message loop of an accepted stream: one message at a time, answered by `answer`.

    A message is held against the bodies' shared budget (max_inflight_body_bytes) while it is
    answered: over it, the answer is `overloaded` and the message is dropped unread. A
    ServiceError is answered as an error message, or closes the socket with its close code;
    anything else closes it with 1011. Counts connections and messages by kind and outcome.
    """
    metrics = runtime.metrics
    metrics.websocket_connections.inc()
    lost = _end_with_the_engine(websocket, runtime)
    answered = {kind: metrics.websocket_messages.labels(kind, "ok") for kind in ("binary", "text")}
    budget = runtime.inflight
    try:
        while True:
            message: Message | None = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            kind = "binary" if data is not None else "text"
            size = _held_bytes(message)
            held = budget.take(size)
            try:
                if not held:
                    raise Overloaded(
                        "the server is holding too many request bodies and messages; retry shortly",
                        runtime.settings.retry_after_s,
                    )
                await answer(message)
                answered[kind].inc()
            except ServiceError as e:
                metrics.websocket_messages.labels(kind, e.code).inc()
                if websocket_close_code(e) is not None:
                    await close_for_error(websocket, e)
                    return
                await websocket.send_text(_encode(error_message(e)).decode())
            finally:
                if held:
                    budget.release(size)
                message = data = None  # not held while the next message is awaited
    except WebSocketDisconnect:
        return
    except Exception:
        logger.exception("websocket stream of %s failed", what)
        with contextlib.suppress(Exception):
            await websocket.close(CLOSE_INTERNAL_ERROR, "internal server error")
    finally:
        metrics.websocket_connections.dec()
        if lost is not None and runtime.engine is not None:
            runtime.engine.on_lost.discard(lost)


def _end_with_the_engine(websocket: WebSocket, runtime: Runtime) -> Callable[[], None] | None:
    """Across the engine boundary a stream is counted (max_streams_per_key) and its session
    bound on the engine's side of this edge's connection: when that connection drops (the
    engine restarts), the stream closes too (1013, as engine_unavailable), idle or not, so
    that no stream outlives what the engine knows of it. The client reconnects."""
    engine = runtime.engine
    if engine is None:
        return None
    loop = asyncio.get_running_loop()

    def lost() -> None:
        error = engine.unavailable()
        task = loop.create_task(_close_quietly(websocket, error))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    engine.on_lost.add(lost)
    return lost


_closing: set[asyncio.Task] = set()  # closes in progress, held until done


async def _close_quietly(websocket: WebSocket, error: ServiceError) -> None:
    with contextlib.suppress(Exception):  # the stream may be closing or gone already
        await close_for_error(websocket, error)


def _held_bytes(message: Message) -> int:
    """A message's size as held: bytes, or text's UTF-8 size bound (its length when ASCII:
    isascii is O(1) on CPython's strings)."""
    data = message.get("bytes")
    if data is not None:
        return len(data)
    text = message.get("text") or ""
    return len(text) if text.isascii() else 4 * len(text)


def _decode_binary(
    data: bytes, spec: inputs.InputSpec, offsets: bool
) -> tuple[int | None, np.ndarray]:
    try:
        offset, rows = decode_frame(data, spec.width, offsets)
    except FrameError as e:
        raise InvalidInput(str(e)) from None
    return inputs.check_offset(offset, "the offset header"), inputs.check_array(
        rows, spec, "inputs"
    )


def _decode_text(
    text: str, spec: inputs.InputSpec, limits: RequestLimits
) -> tuple[int | None, np.ndarray]:
    if not text:
        raise InvalidInput('message: send a JSON object like {"inputs": [[...]]}')
    body = inputs.decode_body(text.encode(), inputs.StepBody, "message", limits=limits)
    return body.offset, inputs.rows(body.inputs, spec, "inputs")


async def close_for_error(websocket: WebSocket, error: ServiceError) -> None:
    """Close a stream for an error: its close code (4400 if none), its message as reason."""
    with contextlib.suppress(RuntimeError):  # the client may be gone already
        await websocket.close(*_close_args(error))


def _close_args(error: ServiceError) -> tuple[int, str]:
    """An error's close code (4400 if none) and its message as the reason (at most 123
    bytes)."""
    code = websocket_close_code(error) or CLOSE_BAD_REQUEST
    return code, error.message.encode()[:120].decode(errors="ignore")
