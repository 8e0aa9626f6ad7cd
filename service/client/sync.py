"""The blocking client: httpx for requests, websockets' sync client for streams."""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect

from service.client import protocol as p


class Client(p.ClientBase):
    """A tcnserve server: models, batch predictions and resumable sessions."""

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
        self._http = httpx.Client(
            base_url=self.base_url, headers=p.auth_headers(api_key), timeout=timeout_s
        )
        self._sockets: weakref.WeakSet[_Socket] = weakref.WeakSet()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sessions this client opened (unless `keep_sessions`), their WebSockets and
        the HTTP connections. A session that cannot be closed (the server is gone) frees its
        slot after its TTL."""
        for session in self._left_open():
            with contextlib.suppress(p.ServerError, p.RetriesExhausted):
                session.close()
        for socket in list(self._sockets):
            socket.close()
        self._http.close()

    def models(self) -> list[dict]:
        return self.run(p.request(p.Call("GET", "/v1/models"), self.retry)).body["models"]

    def model(self, name: str) -> dict:
        return self.run(p.request(p.Call("GET", f"/v1/models/{name}"), self.retry)).body

    def predict(
        self, model: str, sequences: Iterable[Any], outputs: str = "all", embeddings: Any = None
    ) -> list:
        """Whole sequences in, one (T, out) array per sequence out (or (1, out) for "last");
        a conditioned model's sequences each with its embedding (`embeddings`, in order)."""
        shape = self._shape(model)
        body = p.predict_body(shape, sequences, outputs, embeddings)
        call = p.Call("POST", f"/v1/models/{model}/predict", body)
        reply = self.run(p.request(call, self.retry))
        return [np.asarray(o, dtype=np.float32) for o in reply.body["outputs"]]

    def open_session(
        self,
        model: str = "default",
        prefix: Any = None,
        session_id: str | None = None,
        ttl_s: float | None = None,
        embedding: Any = None,
    ) -> Session:
        """A new session, optionally warmed with `prefix` rows (outputs in `.prefix_outputs`);
        a conditioned model's (embedding_dims) with the `embedding` it is conditioned on, which
        the client also sends when it restores the session."""
        shape = self._shape(model)
        rows = shape.rows(prefix) if prefix is not None and len(prefix) else None
        keep = shape.receptive_field - 1
        flow = p.open_session(model, rows, session_id, ttl_s, keep, self.retry, embedding)
        ref, outputs = self.run(flow)
        session = Session(self, ref, shape, outputs)
        self._opened[session.id] = session
        return session

    def push_many(self, pushes: Iterable[tuple[Session, Any]], raise_errors: bool = True) -> list:
        """Push rows to many sessions in one request (POST /v1/steps, split per 1,000).

        `pushes` holds (session, rows) pairs of distinct sessions; the answer, in order, holds
        each one's (T, out) outputs. Every item gets `push`'s guarantees (idempotent retries,
        lost sessions restored). An item that still fails raises its error once every other
        item is done and recorded, or, with raise_errors=False, stands in its place.
        """
        results = self.run(p.push_many(p.many_items(list(pushes)), self.retry))
        if raise_errors:
            p.first_error(results)
        return results

    def _shape(self, model: str) -> p.ModelShape:
        if model not in self._shapes:
            self._shapes[model] = p.ModelShape.from_info(self.model(model))
        return self._shapes[model]

    def run(self, flow: p.Flow, socket: _Socket | None = None) -> Any:
        """Drive a protocol flow to its end, doing the I/O it asks for."""
        value: Any = None
        error: Exception | None = None
        while True:
            try:
                op = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            if isinstance(op, p.Wait):
                time.sleep(op.seconds)
            elif isinstance(op, p.Call):
                try:
                    value = self._send(op)
                except httpx.TransportError as e:
                    error = p.TransportFailure(str(e))
            elif socket is not None:
                if isinstance(op, p.WsClose):
                    socket.abort()
                    continue
                try:
                    value = socket.send(op.data) if isinstance(op, p.WsSend) else socket.recv()
                except p.SocketClosed as e:
                    error = e
                except BaseException:
                    # Interrupted mid-push (KeyboardInterrupt, say): the answer may still be in
                    # flight, and must not be read as the next push's.
                    socket.abort()
                    raise

    def _send(self, call: p.Call) -> p.Reply:
        headers = {"X-Session-ID": call.session_id} if call.session_id else None
        response = self._http.request(call.method, call.path, json=call.json, headers=headers)
        content_type = response.headers.get("content-type")
        body = p.parse_body(response.status_code, content_type, response.content)
        return p.Reply(response.status_code, body, response.headers)


class _Socket:
    """One session's WebSocket, opened on first use and reopened after a failure."""

    def __init__(self, client: Client, session_id: str):
        self._url = p.websocket_url(client.base_url, session_id)
        self._headers = {**p.auth_headers(client.api_key), "X-Session-ID": session_id}
        self._timeout = client.timeout_s
        self._conn: ClientConnection | None = None
        self._stack = ExitStack()  # websockets wants its connection used as a context manager
        client._sockets.add(self)

    def send(self, data: bytes | str) -> None:
        try:
            if self._conn is None:
                self._conn = self._stack.enter_context(
                    connect(
                        self._url,
                        additional_headers=self._headers,
                        open_timeout=self._timeout,
                        compression=None,
                        max_size=None,
                    )
                )
            self._conn.send(data)
        except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as e:
            raise self._closed(e) from None

    def recv(self) -> bytes | str:
        if self._conn is None:
            raise p.SocketClosed(None, "not connected")
        try:
            return self._conn.recv(timeout=self._timeout)
        except (ConnectionClosed, OSError, TimeoutError) as e:
            raise self._closed(e) from None

    def _closed(self, error: Exception) -> p.SocketClosed:
        self.close()
        if isinstance(error, ConnectionClosed) and error.rcvd is not None:
            return p.SocketClosed(error.rcvd.code, error.rcvd.reason)
        return p.SocketClosed(None, str(error))

    def close(self) -> None:
        self._conn = None
        self._stack.close()

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""
        if self._conn is not None:
            self._conn.close_socket()
        self.close()


class Session(p.SessionBase):
    """A streaming session that survives lost connections and lost servers.

    The client assumes it is the only writer of its session (one `Session` per id, used by one
    thread at a time): where the server disagrees with it, the server's session is rebuilt.
    """

    def __init__(self, client: Client, ref: p.SessionRef, shape: p.ModelShape, prefix_outputs):
        super().__init__(ref, shape, prefix_outputs)
        self._client = client
        self._socket = _Socket(client, ref.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push(self, rows: Any) -> np.ndarray:
        """Rows (T, in_channels) in, outputs (T, out) back, over HTTP.

        The client assumes it is the only writer of its session: if the server's session is
        elsewhere (an offset conflict: a push interrupted after it was sent, a stale replica),
        it is rebuilt at the client's position from the kept inputs and the push retried.
        """
        x = self._shape.rows(rows)
        return np.asarray(self._client.run(p.push(self._ref, x, self._client.retry)), np.float32)

    def step(self, row: Any) -> np.ndarray:
        """One timestep in, its output row back."""
        return self.push([row])[0]

    def stream(self, rows: Iterable[Any], chunk: int = 1, binary: bool = True) -> Iterator:
        """Push rows over a WebSocket, `chunk` rows a message; yields one output row per row."""
        binary = binary and not self._shape.tokens
        for batch in p.batches(rows, chunk):
            x = self._shape.rows(batch)
            flow = p.stream_push(self._ref, x, binary, self._client.retry)
            yield from self._client.run(flow, self._socket)

    def snapshot(self) -> dict:
        """The server's snapshot: position and the last min(position, R - 1) input rows."""
        call = p.Call("GET", self._path("/snapshot"), None, self.id)
        return self._client.run(p.request(call, self._client.retry)).body

    def reset(self) -> None:
        call = p.Call("POST", self._path("/reset"), None, self.id)
        self._client.run(p.request(call, self._client.retry))
        self._ref.tracker.reset()

    def close(self) -> None:
        """Delete the session on the server (a session already gone is fine)."""
        self._client._opened.pop(self.id, None)
        self._socket.close()
        call = p.Call("DELETE", self._path(), None, self.id)
        self._client.run(p.request(call, self._client.retry, ok=(204, 404, 410)))
