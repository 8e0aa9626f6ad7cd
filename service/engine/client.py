"""The edge's side of the boundary: what routes call, answered by the engine process.

`EngineClient` keeps one Unix-socket connection to the engine (reconnecting while it is away),
sends typed requests (messages.py), one write per event-loop turn, and settles each request's
future when its answer comes. `RemoteSessions` and `RemoteRegistry` give routes the surface of
the SessionManager and ModelRegistry they use in-process, so a route does not know which engine
it talks to.

While the engine is unreachable every request fails at once with `engine_unavailable` (503,
Retry-After), never a hang; a request in flight when the connection drops fails the same way,
its outcome unknown (a push is retried with its offset, which the engine answers exactly once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import numpy as np

from service.engine import messages as m
from service.models.inputs import InputSpec
from service.protocol.errors import EngineUnavailable, ModelNotFound, ServiceError
from service.sessions.manager import Reply
from service.sessions.state import PushResult, SessionHandle

logger = logging.getLogger(__name__)
RECONNECT_S = 0.05  # between tries to reach an engine that is away (it restarts in seconds)
STATUS_EVERY_S = 0.5  # how often an edge asks the engine's readiness (and reports its metrics)
# An engine that answers no status request for this long is stuck: its connection is dropped,
# so that requests waiting on it fail (engine_unavailable) instead of hanging, and /readyz is
# 503 meanwhile.
ENGINE_SILENT_S = 10.0


class EngineClient:
    """One connection to the engine, shared by every request of this edge process."""

    def __init__(self, path: str, retry_after_s: int, edge_metrics: Callable[[], bytes]):
        self.path = path
        self.retry_after_s = retry_after_s
        self.welcome: m.Welcome | None = None  # the engine's last status
        self.ever_connected = asyncio.Event()
        self._edge_metrics = edge_metrics
        self._transport: Any = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._out: list[bytes] = []
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(m.Answer).decode
        self._reader = m.FrameReader()
        self._lost: asyncio.Event = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.on_welcome: Callable[[m.Welcome], None] | None = None
        # Called when the connection to the engine drops: what lives only as long as the
        # engine connection (an open WebSocket stream, counted and bound there) ends with it.
        self.on_lost: set[Callable[[], None]] = set()
        self._welcomed_at = 0.0

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tcnserve-engine")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                await loop.create_unix_connection(lambda: _Protocol(self), self.path)
            except OSError:
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                while self._transport is not None:
                    welcome = await asyncio.wait_for(self.call(m.Status(0)), ENGINE_SILENT_S)
                    self._welcomed(welcome)
                    self.ever_connected.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._lost.wait(), STATUS_EVERY_S)
                    if self._transport is not None:
                        report = m.EdgeMetrics(0, os.getpid(), self._edge_metrics())
                        await asyncio.wait_for(self.call(report), ENGINE_SILENT_S)
            except EngineUnavailable:
                pass
            except TimeoutError:  # alive but stuck: every request in flight fails, not hangs
                logger.error(
                    "the engine answered no status request in %g s; dropping its connection",
                    ENGINE_SILENT_S,
                )
                if self._transport is not None:
                    self._transport.close()
            except Exception:
                logger.exception("talking to the engine failed")
                if self._transport is not None:
                    self._transport.close()
            await self._lost.wait()

    @property
    def fresh(self) -> bool:
        """Connected, and the engine's status is recent: it is alive and says so."""
        return (
            self._transport is not None
            and self.welcome is not None
            and time.monotonic() - self._welcomed_at < ENGINE_SILENT_S
        )

    def _welcomed(self, welcome: m.Welcome) -> None:
        self.welcome = welcome
        self._welcomed_at = time.monotonic()
        if self.on_welcome is not None:
            self.on_welcome(welcome)

    def unavailable(self) -> EngineUnavailable:
        return EngineUnavailable(
            "the engine is not reachable (it is restarting); retry shortly, a push with its offset",
            self.retry_after_s,
        )

    async def call(self, request: Any) -> Any:
        """Send `request` (its id is set here) and return its answer; raises its ServiceError."""
        return await self.answer(self.send(request))

    def send(self, request: Any) -> asyncio.Future:
        """Queue `request` for this turn's write, at once (a caller cancelled right after still
        had it sent); the future of its answer. Raises engine_unavailable when disconnected."""
        if self._transport is None:
            raise self.unavailable()
        request.id = id = next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[id] = future
        out = self._out
        payload = self._encode(request)
        out.append(m.HEADER.pack(len(payload)))
        out.append(payload)
        if len(out) == 2:
            loop.call_soon(self._flush)
        # The entry goes when the answer comes (always, or the connection drops): a caller
        # that gave up leaves it only that long.
        return future

    @staticmethod
    async def answer(future: asyncio.Future) -> Any:
        """The answer of a request `send` queued; raises its ServiceError."""
        answer = await future
        if type(answer) is m.Failed:
            raise answer.error()
        return answer

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None:
            self._transport.writelines(out)

    # ----- called by the protocol ------------------------------------------------------------

    def _connected(self, transport: Any) -> None:
        self._transport = transport
        self._reader = m.FrameReader()
        self._lost = asyncio.Event()
        logger.info("connected to the engine at %s", self.path)

    def _received(self, data: bytes) -> None:
        try:
            answers = [self._decode(f) for f in self._reader.feed(data)]
        except (ValueError, msgspec.DecodeError):
            logger.exception("the engine sent an unreadable frame; reconnecting")
            self._transport.close()
            return
        pending = self._pending
        for answer in answers:
            if answer.id == 0 and type(answer) is m.Welcome:  # the engine's status changed
                self._welcomed(answer)
                continue
            future = pending.pop(answer.id, None)
            if future is not None and not future.done():
                future.set_result(answer)

    def _disconnected(self) -> None:
        if self._transport is not None and not self._closing:
            logger.warning("lost the engine connection; answering engine_unavailable meanwhile")
        self._transport = None
        self._out = []
        for callback in list(self.on_lost):
            try:
                callback()
            except Exception:
                logger.exception("ending what the engine connection held failed")
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    EngineUnavailable(
                        "the engine went away while this request was in flight: its outcome "
                        "is unknown; retry it (a push with its offset) once the engine is back",
                        self.retry_after_s,
                    )
                )
        self._lost.set()


class _Protocol(asyncio.Protocol):
    def __init__(self, client: EngineClient):
        self.client = client

    def connection_made(self, transport: Any) -> None:
        self.client._connected(transport)

    def data_received(self, data: bytes) -> None:
        self.client._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._disconnected()


# ----- the surfaces routes use ---------------------------------------------------------------


class ModelShape(NamedTuple):
    """The parts of a model's TCNConfig an edge reads."""

    in_channels: int
    output_size: int
    receptive_field: int
    vocab_size: int | None


class RemoteModel:
    """A model served by the engine, as a ModelEntry looks to routes."""

    def __init__(self, client: EngineClient, view: m.ModelView):
        self._client = client
        self.view = view
        self.name: str = view.info["name"]
        info = view.info
        self.config = ModelShape(
            info["in_channels"], info["out_channels"], view.receptive_field, info["vocab_size"]
        )
        dims = info.get("embedding_dims") or ()
        self.inputs = InputSpec(
            view.width, view.vocab_size, np.dtype(view.input_dtype), view.max_abs, sum(dims)
        )
        self.capacity: int = info["max_sessions"]

    @property
    def ready(self) -> bool:
        return self._client.fresh and self._client.welcome.ready

    def info(self) -> dict[str, Any]:
        return {**self.view.info, "ready": self.ready}

    async def predict(
        self,
        sequences: list[np.ndarray],
        last_only: bool,
        embeddings: list[list[float]] | None = None,
    ) -> list[np.ndarray]:
        rows = [m.Rows.of(np.ascontiguousarray(s)) for s in sequences]
        answer = await self._client.call(m.Predict(0, self.name, rows, last_only, embeddings))
        return [rows.array() for rows in answer.outputs]


class RemoteRegistry:
    """The ModelRegistry surface: the engine's models, as its last status described them."""

    def __init__(self, client: EngineClient, names: list[str]):
        self._client = client
        self._names = names
        self._models: dict[str, RemoteModel] = {}

    def update(self, welcome: m.Welcome) -> None:
        if not self._models or any(v.info["name"] not in self._models for v in welcome.models):
            self._models = {v.info["name"]: RemoteModel(self._client, v) for v in welcome.models}
        else:
            for v in welcome.models:
                self._models[v.info["name"]].view = v

    @property
    def ready(self) -> bool:
        return self._client.fresh and self._client.welcome.ready

    def names(self) -> list[str]:
        return list(self._names)

    def entries(self) -> list[RemoteModel]:
        self._require()
        return list(self._models.values())

    def get(self, name: str) -> RemoteModel:
        self._require()
        try:
            return self._models[name]
        except KeyError:
            served = ", ".join(self._names)
            raise ModelNotFound(f"no model named {name!r}; served: {served}") from None

    def _require(self) -> None:
        if not self._models:
            raise self._client.unavailable()


class RemoteSessions:
    """The SessionManager surface routes use; each call is one request to the engine."""

    def __init__(self, client: EngineClient, registry: RemoteRegistry, models: list[str]):
        self._client = client
        self._registry = registry
        self._only = models[0] if len(models) == 1 else None

    async def create(
        self,
        owner: str,
        model: str,
        session_id: str | None = None,
        ttl_s: float | None = None,
        prefix: np.ndarray | None = None,
        snapshot: tuple[int, np.ndarray] | None = None,
        *,
        bound: bool = False,
        embedding: list[float] | None = None,
    ) -> tuple[m.SessionView, np.ndarray]:
        answer = await self._client.call(
            m.Create(
                0,
                owner,
                model,
                session_id,
                ttl_s,
                None if prefix is None else m.Rows.of(prefix),
                None if snapshot is None else snapshot[0],
                None if snapshot is None else m.Rows.of(snapshot[1]),
                bound,
                embedding,
            )
        )
        return answer.session, answer.outputs.array()

    async def resolve(self, owner: str, session_id: str) -> SessionHandle:
        """The handle to decode a push against: with one model served, known without asking
        the engine (the push reports a missing session); with several, one Resolve request
        (a session may have been deleted and opened again on another model through another
        edge, so what this edge saw before is never trusted to decode rows)."""
        if self._only is not None:
            return self._handle(owner, session_id, self._only)
        (handle,) = await self.resolve_many(owner, [session_id])
        if isinstance(handle, ServiceError):
            raise handle
        return handle

    async def resolve_many(
        self, owner: str, session_ids: list[str]
    ) -> list[SessionHandle | ServiceError]:
        if self._only is not None:
            return [self._handle(owner, s, self._only) for s in session_ids]
        answer = await self._client.call(m.Resolve(0, owner, session_ids))
        return [
            model.error() if type(model) is m.Failed else self._handle(owner, session_id, model)
            for session_id, model in zip(session_ids, answer.models, strict=True)
        ]

    def handle(self, session: m.SessionView) -> SessionHandle:
        """The handle of a session the engine has just described (a stream keeps one)."""
        return self._handle(session.owner, session.id, session.model)

    def _handle(self, owner: str, session_id: str, model: str) -> SessionHandle:
        return SessionHandle(owner, session_id, model, self._registry.get(model).inputs)

    async def push(self, handle: SessionHandle, x: np.ndarray, offset: int | None) -> PushResult:
        answer = await self._client.send(
            m.Push(0, handle.owner, handle.session_id, m.Rows.of(x), offset)
        )
        if type(answer) is m.Failed:
            raise answer.error()
        return PushResult(answer.outputs.array(), answer.position)

    def start_push(
        self, handle: SessionHandle, x: np.ndarray, offset: int | None, reply: Reply
    ) -> bool:
        """`push` answered by `reply(result, error)` from the callback that reads the engine's
        answer (SessionManager.start_push's counterpart): no task waits for it."""
        future = self._client.send(m.Push(0, handle.owner, handle.session_id, m.Rows.of(x), offset))
        future.add_done_callback(functools.partial(self._replied, reply))
        return True

    def _replied(self, reply: Reply, future: asyncio.Future) -> None:
        """A push's answer from the engine, to `reply`: its outputs, or its error."""
        if future.cancelled():  # nothing cancels these; if something did, the outcome is unknown
            reply(None, self._client.unavailable())
            return
        error = future.exception()
        if error is not None:
            reply(None, error)
            return
        answer = future.result()
        if type(answer) is m.Failed:
            reply(None, answer.error())
        else:
            reply(PushResult(answer.outputs.array(), answer.position), None)

    async def push_many(
        self, items: list[tuple[SessionHandle, np.ndarray, int | None]]
    ) -> list[PushResult | ServiceError]:
        if not items:
            return []
        owner = items[0][0].owner
        answer = await self._client.call(
            m.PushMany(
                0,
                owner,
                [handle.session_id for handle, _, _ in items],
                [m.Rows.of(x) for _, x, _ in items],
                [offset for _, _, offset in items],
            )
        )
        return [
            res.error() if type(res) is m.Failed else PushResult(res.outputs.array(), res.position)
            for res in answer.results
        ]

    async def get(self, owner: str, session_id: str) -> m.SessionView:
        answer = await self._client.call(m.Get(0, owner, session_id))
        return answer.session

    async def snapshot(self, owner: str, session_id: str) -> tuple[m.SessionView, np.ndarray]:
        answer = await self._client.call(m.TakeSnapshot(0, owner, session_id))
        return answer.session, answer.rows.array()

    async def reset(self, owner: str, session_id: str) -> m.SessionView:
        answer = await self._client.call(m.Reset(0, owner, session_id))
        return answer.session

    async def delete(self, owner: str, session_id: str) -> None:
        await self._client.call(m.Delete(0, owner, session_id))

    async def list(
        self, owner: str, limit: int, after: str | None = None, model: str | None = None
    ) -> tuple[list[m.SessionView], str | None]:
        answer = await self._client.call(m.ListSessions(0, owner, limit, after, model))
        return answer.sessions, answer.next

    async def delete_all(self, owner: str, model: str | None = None) -> int:
        return (await self._client.call(m.DeleteSessions(0, owner, model))).count

    async def close(self, session: m.SessionView) -> None:
        """Delete this very session, if it is still open: never a newer one under its id."""
        await self._client.answer(self.start_close(session))

    def start_close(self, session: m.SessionView) -> asyncio.Future:
        """`close`, sent at once (it reaches the engine even if the caller is cancelled)."""
        return self._client.send(m.Close(0, session.owner, session.id, session.serial))


class RemoteStreams:
    """max_streams_per_key, counted by the engine over every edge."""

    def __init__(self, client: EngineClient):
        self._client = client

    async def acquire(self, owner: str) -> None:
        await self._client.call(m.StreamOpen(0, owner))

    async def release(self, owner: str) -> None:
        with contextlib.suppress(ServiceError):  # the engine went away: it released it then
            await self._client.answer(self.start_release(owner))

    def start_release(self, owner: str) -> asyncio.Future:
        """`release`, sent at once (it reaches the engine even if the caller is cancelled)."""
        return self._client.send(m.StreamClose(0, owner))
