"""The asyncio client: the same protocol as the blocking one, driven with await."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from service.client import protocol as p


class AsyncClient(p.ClientBase):
    """A tcnserve server, from asyncio code."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry: p.RetryPolicy | None = None,
        keep_sessions: bool = False,
    ):
        super().__init__(base_url, api_key, timeout_s, retry, keep_sessions)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=p.auth_headers(api_key), timeout=timeout_s
        )
        self._sockets: weakref.WeakSet[_AsyncSocket] = weakref.WeakSet()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """`Client.close`: the sessions it opened (unless `keep_sessions`), their WebSockets,
        the HTTP connections."""
        for session in self._left_open():
            with contextlib.suppress(p.ServerError, p.RetriesExhausted):
                await session.close()
        for socket in list(self._sockets):
            await socket.close()
        await self._http.aclose()

    async def models(self) -> list[dict]:
        return (await self.run(p.request(p.Call("GET", "/v1/models"), self.retry))).body["models"]

    async def model(self, name: str) -> dict:
        return (await self.run(p.request(p.Call("GET", f"/v1/models/{name}"), self.retry))).body

    async def predict(
        self, model: str, sequences: Iterable[Any], outputs: str = "all", embeddings: Any = None
    ) -> list:
        shape = await self._shape(model)
        body = p.predict_body(shape, sequences, outputs, embeddings)
        call = p.Call("POST", f"/v1/models/{model}/predict", body)
        reply = await self.run(p.request(call, self.retry))
        return [np.asarray(o, dtype=np.float32) for o in reply.body["outputs"]]

    async def open_session(
        self,
        model: str = "default",
        prefix: Any = None,
        session_id: str | None = None,
        ttl_s: float | None = None,
        embedding: Any = None,
    ) -> AsyncSession:
        shape = await self._shape(model)
        rows = shape.rows(prefix) if prefix is not None and len(prefix) else None
        keep = shape.receptive_field - 1
        flow = p.open_session(model, rows, session_id, ttl_s, keep, self.retry, embedding)
        ref, outputs = await self.run(flow)
        session = AsyncSession(self, ref, shape, outputs)
        self._opened[session.id] = session
        return session

    async def push_many(
        self, pushes: Iterable[tuple[AsyncSession, Any]], raise_errors: bool = True
    ) -> list:
        """Push rows to many sessions in one request (POST /v1/steps, split per 1,000).

        `pushes` holds (session, rows) pairs of distinct sessions; the answer, in order, holds
        each one's (T, out) outputs. Every item gets `push`'s guarantees (idempotent retries,
        lost sessions restored). An item that still fails raises its error once every other
        item is done and recorded, or, with raise_errors=False, stands in its place.
        """
        results = await self.run(p.push_many(p.many_items(list(pushes)), self.retry))
        if raise_errors:
            p.first_error(results)
        return results

    async def _shape(self, model: str) -> p.ModelShape:
        if model not in self._shapes:
            self._shapes[model] = p.ModelShape.from_info(await self.model(model))
        return self._shapes[model]

    async def run(self, flow: p.Flow, socket: _AsyncSocket | None = None) -> Any:
        """Drive a protocol flow to its end, awaiting the I/O it asks for."""
        value: Any = None
        error: Exception | None = None
        while True:
            try:
                op = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            if isinstance(op, p.Wait):
                await asyncio.sleep(op.seconds)
            elif isinstance(op, p.Call):
                try:
                    value = await self._send(op)
                except httpx.TransportError as e:
                    error = p.TransportFailure(str(e))
            elif socket is not None:
                if isinstance(op, p.WsClose):
                    socket.abort()
                    continue
                try:
                    if isinstance(op, p.WsSend):
                        value = await socket.send(op.data)
                    else:
                        value = await socket.recv()
                except p.SocketClosed as e:
                    error = e
                except BaseException:
                    # Cancelled mid-push (asyncio.wait_for around a stream, say): the answer
                    # may still be in flight, and must not be read as the next push's.
                    socket.abort()
                    raise

    async def _send(self, call: p.Call) -> p.Reply:
        headers = {"X-Session-ID": call.session_id} if call.session_id else None
        response = await self._http.request(call.method, call.path, json=call.json, headers=headers)
        content_type = response.headers.get("content-type")
        body = p.parse_body(response.status_code, content_type, response.content)
        return p.Reply(response.status_code, body, response.headers)


class _AsyncSocket:
    def __init__(self, client: AsyncClient, session_id: str):
        self._url = p.websocket_url(client.base_url, session_id)
        self._headers = {**p.auth_headers(client.api_key), "X-Session-ID": session_id}
        self._timeout = client.timeout_s
        self._conn: ClientConnection | None = None
        client._sockets.add(self)

    async def send(self, data: bytes | str) -> None:
        try:
            if self._conn is None:
                self._conn = await connect(
                    self._url,
                    additional_headers=self._headers,
                    open_timeout=self._timeout,
                    compression=None,
                    max_size=None,
                )
            await self._conn.send(data)
        except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as e:
            raise await self._closed(e) from None

    async def recv(self) -> bytes | str:
        if self._conn is None:
            raise p.SocketClosed(None, "not connected")
        try:
            return await asyncio.wait_for(self._conn.recv(), self._timeout)
        except (ConnectionClosed, OSError, TimeoutError) as e:
            raise await self._closed(e) from None

    async def _closed(self, error: Exception) -> p.SocketClosed:
        await self.close()
        if isinstance(error, ConnectionClosed) and error.rcvd is not None:
            return p.SocketClosed(error.rcvd.code, error.rcvd.reason)
        return p.SocketClosed(None, str(error))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (no await: safe while
        the task is being cancelled)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.transport.abort()


class AsyncSession(p.SessionBase):
    """The asyncio twin of `Session`; it too assumes it is the only writer of its session
    (one task at a time), and rebuilds the server's session where the two disagree."""

    def __init__(self, client: AsyncClient, ref: p.SessionRef, shape: p.ModelShape, prefix_out):
        super().__init__(ref, shape, prefix_out)
        self._client = client
        self._socket = _AsyncSocket(client, ref.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def push(self, rows: Any) -> np.ndarray:
        """`Session.push`: an offset conflict rebuilds the session at the client's position."""
        x = self._shape.rows(rows)
        outputs = await self._client.run(p.push(self._ref, x, self._client.retry))
        return np.asarray(outputs, dtype=np.float32)

    async def step(self, row: Any) -> np.ndarray:
        return (await self.push([row]))[0]

    async def stream(
        self, rows: Iterable[Any] | AsyncIterable[Any], chunk: int = 1, binary: bool = True
    ) -> AsyncIterator[np.ndarray]:
        """Rows (an iterable or an async iterable) over a WebSocket; yields output rows."""
        binary = binary and not self._shape.tokens
        async for batch in _abatches(rows, chunk):
            x = self._shape.rows(batch)
            flow = p.stream_push(self._ref, x, binary, self._client.retry)
            for row in await self._client.run(flow, self._socket):
                yield row

    async def snapshot(self) -> dict:
        call = p.Call("GET", self._path("/snapshot"), None, self.id)
        return (await self._client.run(p.request(call, self._client.retry))).body

    async def reset(self) -> None:
        call = p.Call("POST", self._path("/reset"), None, self.id)
        await self._client.run(p.request(call, self._client.retry))
        self._ref.tracker.reset()

    async def close(self) -> None:
        self._client._opened.pop(self.id, None)
        await self._socket.close()
        call = p.Call("DELETE", self._path(), None, self.id)
        await self._client.run(p.request(call, self._client.retry, ok=(204, 404, 410)))


async def _abatches(rows: Iterable[Any] | AsyncIterable[Any], size: int) -> AsyncIterator[list]:
    if not isinstance(rows, AsyncIterable):
        for batch in p.batches(rows, size):
            yield batch
        return
    if size < 1:
        raise ValueError(f"chunk must be >= 1, got {size}")
    batch: list = []
    async for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
