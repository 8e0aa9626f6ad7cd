"""The engine process's side of the boundary: every edge's requests, answered by one Runtime.

`EngineServer` listens on a Unix socket. Each edge connection decodes its frames into typed
requests (messages.py) and runs each as a task on this process's event loop, against the same
SessionManager, ModelRegistry and worker threads an in-process server uses, so pushes from every
edge join the same micro-batches. Answers made during one loop turn go back in one write.

A connection owns what it opened for a connection of its own: the sessions of `WS /v1/stream`
(without keep) and its WebSocket stream counts (max_streams_per_key). When an edge goes away,
even by SIGKILL, the engine closes those sessions and releases those counts; nothing it held
outlives it. Sessions opened over HTTP, and every acknowledged push, stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import numpy as np

from service.engine import messages as m
from service.engine.metrics import MetricsSum
from service.engine.runtime import Runtime
from service.protocol.errors import InternalError, ServiceError, TooManyTimesteps
from service.sessions.state import Session

logger = logging.getLogger(__name__)


def view(session: Session) -> m.SessionView:
    return m.SessionView(
        session.id,
        session.owner,
        session.model,
        session.ttl_s,
        session.created_at,
        session.last_used_at,
        session.position,
        session.serial,
        None if session.embedding is None else session.embedding.tolist(),
    )


class EngineServer:
    """Serves `runtime` (built in-process, models loaded by `runtime.start`) to edges."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.connections: set[_Connection] = set()
        self.metrics = MetricsSum()
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path)
        os.chmod(path, 0o600)  # the edges run as this user; nobody else may speak for them

    async def edges_gone(self, timeout_s: float) -> None:
        """Return once no edge is connected (or after `timeout_s`)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.flush()  # what was sent last (a status broadcast) still goes out
            connection.transport.close()
        for connection in list(self.connections):
            await connection.closed()

    def broadcast(self) -> None:
        """Tell every edge the engine's status now (id 0: no request asked), when it changes:
        loaded, or draining; otherwise they learn it within STATUS_EVERY_S."""
        for connection in self.connections:
            connection.send(self.welcome(0))

    def welcome(self, id: int) -> m.Welcome:
        runtime = self.runtime
        models = []
        for entry in runtime.registry.entries():
            spec = entry.inputs
            models.append(
                m.ModelView(
                    entry.info(),
                    spec.width,
                    spec.vocab_size,
                    spec.dtype.str,
                    spec.max_abs,
                    entry.config.output_size,
                    entry.config.receptive_field,
                )
            )
        return m.Welcome(
            id,
            runtime.registry.ready and runtime.store_ready,
            runtime.draining,
            runtime.load_error,
            models,
            runtime.settings.max_sessions,
        )


class _Connection(asyncio.Protocol):
    """One edge process's connection."""

    def __init__(self, server: EngineServer):
        self.server = server
        self.runtime = server.runtime
        self.sessions = server.runtime.sessions
        self.transport: Any = None
        self._reader = m.FrameReader()
        self._decode = msgspec.msgpack.Decoder(m.Request).decode
        self._encode = msgspec.msgpack.Encoder().encode
        self._out: list[bytes] = []
        self._tasks: set[asyncio.Task] = set()
        self._bound: dict[tuple[str, str], int] = {}  # sessions that end with this connection
        self._streams: Counter[str] = Counter()
        self.edge_metrics = b""  # the edge's own series, as it last reported them
        self._lost = asyncio.get_running_loop().create_future()
        self._handlers: dict[type, Callable[[Any], Awaitable[m.Answer]]] = {
            m.Status: self._status,
            m.Create: self._create,
            m.Push: self._push,
            m.PushMany: self._push_many,
            m.Get: self._get,
            m.Resolve: self._resolve,
            m.TakeSnapshot: self._snapshot,
            m.Reset: self._reset,
            m.Delete: self._delete,
            m.ListSessions: self._list,
            m.DeleteSessions: self._delete_all,
            m.Close: self._close,
            m.Predict: self._predict,
            m.StreamOpen: self._stream_open,
            m.StreamClose: self._stream_close,
            m.MetricsText: self._metrics,
            m.EdgeMetrics: self._edge_metrics,
        }

    # ----- transport -------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
            requests = [self._decode(f) for f in frames]
        except (ValueError, msgspec.DecodeError):
            logger.exception("an edge sent an unreadable frame; dropping its connection")
            self.transport.close()
            return
        loop = asyncio.get_running_loop()
        ready = self.runtime.ready_or_draining  # once per read, not per push
        for request in requests:
            if ready and type(request) is m.Push and self._push_now(request):
                continue
            task = loop.create_task(self._answer(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _push_now(self, r: m.Push) -> bool:
        """The hot path: a push to a free session held here starts at once, answered by a
        callback as it is recorded (no task, no future). False: it needs the general path."""
        id = r.id
        send = self._send

        def reply(result: Any, error: BaseException | None) -> None:
            if error is None:
                send(m.Pushed(id, m.Rows.of(result.outputs), result.position))
            elif isinstance(error, ServiceError):
                send(m.Failed.of(id, error))
            else:
                logger.error("the engine failed a push", exc_info=error)
                send(m.Failed.of(id, InternalError("internal server error")))

        try:
            return self.sessions.push_now(r.owner, r.session_id, r.rows.array(), r.offset, reply)
        except ServiceError as e:
            send(m.Failed.of(id, e))
        except Exception:
            logger.exception("the engine failed a push")
            send(m.Failed.of(id, InternalError("internal server error")))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.edge_metrics:
            self.server.metrics.retire(self.edge_metrics)
        # The requests in flight run to their end (their answers go nowhere), so that a
        # session this connection was opening is bound before what is bound is released.
        task = asyncio.get_running_loop().create_task(self._release_all())
        task.add_done_callback(lambda t: self._lost.set_result(None))

    async def closed(self) -> None:
        await self._lost

    def send(self, answer: m.Answer) -> None:
        self._send(answer)

    def flush(self) -> None:
        if self._out:
            self._flush()

    def _send(self, answer: m.Answer) -> None:
        out = self._out
        try:
            payload = self._encode(answer)
        except Exception:  # never a request left unanswered
            logger.exception("encoding a %s failed", type(answer).__name__)
            payload = self._encode(m.Failed.of(answer.id, InternalError("internal server error")))
        if len(payload) > m.MAX_FRAME_BYTES:  # never an answer the edge would refuse to read
            payload = self._encode(
                m.Failed.of(
                    answer.id,
                    TooManyTimesteps(
                        f"the answer would be {len(payload)} bytes, more than the "
                        f"{m.MAX_FRAME_BYTES} one answer may carry: ask for fewer rows"
                    ),
                )
            )
        out.append(m.HEADER.pack(len(payload)))
        out.append(payload)
        if len(out) == 2:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not out:
            return
        if not self.transport.is_closing():
            self.transport.writelines(out)

    async def _answer(self, request: Any) -> None:
        try:
            answer = await self._handlers[type(request)](request)
        except ServiceError as e:
            answer = m.Failed.of(request.id, e)
        except Exception:
            logger.exception("the engine failed a %s", type(request).__name__)
            answer = m.Failed.of(request.id, InternalError("internal server error"))
        self._send(answer)

    async def _release_all(self) -> None:
        """The edge is gone: close the sessions bound to its sockets, release its streams."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for owner, held in self._streams.items():
            for _ in range(held):
                self.runtime.streams.release(owner)
        self._streams.clear()
        for (owner, session_id), serial in list(self._bound.items()):
            session = self.sessions.local(owner, session_id)
            if session is not None and session.serial == serial:
                with contextlib.suppress(ServiceError):
                    await self.sessions.close(session)
        self._bound.clear()

    # ----- handlers --------------------------------------------------------------------------

    async def _status(self, r: m.Status) -> m.Answer:
        return self.server.welcome(r.id)

    async def _create(self, r: m.Create) -> m.Answer:
        self.runtime.check_accepting()
        snapshot = None
        if r.snapshot is not None:
            snapshot = (r.snapshot_position or 0, r.snapshot.array())
        session, outputs = await self.sessions.create(
            r.owner,
            r.model,
            r.session_id,
            r.ttl_s,
            r.prefix.array() if r.prefix is not None else None,
            snapshot,
            embedding=r.embedding,
        )
        if r.bound:
            self._bound[(session.owner, session.id)] = session.serial
        return m.Created(r.id, view(session), m.Rows.of(np.ascontiguousarray(outputs)))

    async def _push(self, r: m.Push) -> m.Answer:
        self.runtime.check_ready()
        handle = await self.sessions.resolve(r.owner, r.session_id)
        result = await self.sessions.push(handle, r.rows.array(), r.offset)
        return m.Pushed(r.id, m.Rows.of(result.outputs), result.position)

    async def _push_many(self, r: m.PushMany) -> m.Answer:
        self.runtime.check_ready()
        handles = await self.sessions.resolve_many(r.owner, r.session_ids)
        ready = [i for i, h in enumerate(handles) if not isinstance(h, ServiceError)]
        results = await self.sessions.push_many(
            [(handles[i], r.rows[i].array(), r.offsets[i]) for i in ready]  # type: ignore[misc]
        )
        answers: list[m.Pushed | m.Failed] = [
            m.Failed.of(0, h) if isinstance(h, ServiceError) else None  # type: ignore[misc]
            for h in handles
        ]
        for i, res in zip(ready, results, strict=True):
            answers[i] = (
                m.Failed.of(0, res)
                if isinstance(res, ServiceError)
                else m.Pushed(0, m.Rows.of(res.outputs), res.position)
            )
        return m.PushedMany(r.id, answers)

    async def _get(self, r: m.Get) -> m.Answer:
        self.runtime.check_ready()
        return m.Described(r.id, view(await self.sessions.get(r.owner, r.session_id)))

    async def _resolve(self, r: m.Resolve) -> m.Answer:
        self.runtime.check_ready()
        handles = await self.sessions.resolve_many(r.owner, r.session_ids)
        return m.Resolved(
            r.id,
            [m.Failed.of(0, h) if isinstance(h, ServiceError) else h.model for h in handles],
        )

    async def _snapshot(self, r: m.TakeSnapshot) -> m.Answer:
        self.runtime.check_ready()
        session, rows = await self.sessions.snapshot(r.owner, r.session_id)
        return m.Snapshotted(r.id, view(session), m.Rows.of(np.ascontiguousarray(rows)))

    async def _reset(self, r: m.Reset) -> m.Answer:
        self.runtime.check_ready()
        return m.Described(r.id, view(await self.sessions.reset(r.owner, r.session_id)))

    async def _delete(self, r: m.Delete) -> m.Answer:
        self.runtime.check_ready()
        await self.sessions.delete(r.owner, r.session_id)
        self._bound.pop((r.owner, r.session_id), None)
        return m.Done(r.id)

    async def _list(self, r: m.ListSessions) -> m.Answer:
        self.runtime.check_ready()
        page, after = await self.sessions.list(r.owner, r.limit, r.after, r.model)
        return m.Listed(r.id, [view(s) for s in page], after)

    async def _delete_all(self, r: m.DeleteSessions) -> m.Answer:
        self.runtime.check_ready()
        return m.Deleted(r.id, await self.sessions.delete_all(r.owner, r.model))

    async def _close(self, r: m.Close) -> m.Answer:
        key = (r.owner, r.session_id)
        if self._bound.get(key) == r.serial:
            del self._bound[key]
        session = self.sessions.local(r.owner, r.session_id)
        if session is not None and session.serial == r.serial:
            await self.sessions.close(session)
        return m.Done(r.id)

    async def _predict(self, r: m.Predict) -> m.Answer:
        self.runtime.check_ready()
        entry = self.runtime.registry.get(r.model)
        sequences = [rows.array() for rows in r.sequences]
        outputs = await entry.predict(sequences, r.last_only, r.embeddings)
        return m.Predicted(r.id, [m.Rows.of(np.ascontiguousarray(y)) for y in outputs])

    async def _stream_open(self, r: m.StreamOpen) -> m.Answer:
        self.runtime.streams.acquire(r.owner)
        self._streams[r.owner] += 1
        return m.Done(r.id)

    async def _stream_close(self, r: m.StreamClose) -> m.Answer:
        if self._streams[r.owner] > 0:
            self._streams[r.owner] -= 1
            if not self._streams[r.owner]:
                del self._streams[r.owner]
            self.runtime.streams.release(r.owner)
        return m.Done(r.id)

    async def _metrics(self, r: m.MetricsText) -> m.Answer:
        """Every process's page; the asking edge sums them (the parsing costs its CPU, not the
        engine's loop, which every push goes through)."""
        self.edge_metrics = r.edge
        pages = [self.runtime.metrics.render(), *self.server.metrics.gone()]
        pages += [c.edge_metrics for c in self.server.connections if c.edge_metrics]
        return m.Pages(r.id, pages)

    async def _edge_metrics(self, r: m.EdgeMetrics) -> m.Answer:
        self.edge_metrics = r.text
        return m.Done(r.id)
