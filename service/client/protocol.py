"""The client's session protocol, free of I/O: what to send, and what a reply means.

Flows are generators. They yield `Call` (an HTTP request to make) or `Wait` (a pause before a
retry) and receive a `Reply`; a transport failure is thrown into them as `TransportFailure`.
The sync and async clients only drive them, so both behave identically.

The client assumes it is the only writer of its session (it chose the id): when the server's
position disagrees with its own (an offset conflict, a socket answer for another push), it
makes the server's session agree with what it knows, rather than the other way round.

Resume by replay: a TCN's outputs after position p depend only on the last R - 1 inputs
(R = receptive field). The client keeps those rows (`Tracker`); if the server loses the session
(restart, lost replica, TTL) it re-creates it from them with a snapshot and carries on, and the
caller sees the same outputs as if nothing had happened.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from service.protocol import error_codes
from service.protocol.wire import HEADER, ROW_DTYPE, decode_frame, encode_frame


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: Any = None
    session_id: str | None = None  # also sent as X-Session-ID, for consistent-hash routing


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


class TransportFailure(Exception):
    """The request may or may not have reached the server (connection refused, reset, timeout)."""


class ServerError(Exception):
    """The server refused a request with an error that retrying cannot fix."""

    def __init__(self, status: int, code: str, message: str, body: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.body = status, code, message, body

    @classmethod
    def from_reply(cls, reply: Reply) -> ServerError:
        error = reply.body.get("error", {}) if isinstance(reply.body, dict) else {}
        return cls(reply.status, error.get("code", "error"), error.get("message", ""), reply.body)


class RetriesExhausted(ConnectionError):
    """The server could not be reached (or kept refusing) within the retry budget."""

    def __init__(self, what: str, attempts: int, last: Reply | None = None):
        if last is None:
            detail = "no answer"
        else:
            error = ServerError.from_reply(last)
            detail = f"last answer {error.status} {error.code}: {error.message}"
        super().__init__(f"{what}: {detail} after {attempts} tries")
        self.last = last


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def delay(self, attempt: int, reply: Reply | None = None) -> float:
        retry_after = reply.headers.get("retry-after") if reply is not None else None
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)


RETRYABLE = frozenset({429, 502, 503, 504})
Flow = Generator[Any, Any, Any]  # yields Call, Wait, WsSend, WsRecv, WsClose


def parse_body(status: int, content_type: str | None, content: bytes) -> Any:
    """A reply's body: JSON when the reply says it is JSON (and is), None when empty, else an
    error body made of its text (a proxy's HTML 502 page, say), so `ServerError.from_reply`
    still tells what happened and a retryable status is retried, not a decoding crash."""
    if not content:
        return None
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(content)
        except ValueError:
            pass
    text = content.decode("utf-8", "replace").strip()
    return {"error": {"code": f"http_{status}", "message": text[:200]}}


def new_session_id() -> str:
    """Client-chosen ids let a retried create be recognised and a proxy route by id."""
    return secrets.token_urlsafe(24)


class Tracker:
    """What the client knows of a session: its position and the inputs that define its state."""

    def __init__(self, keep: int, position: int = 0, tail: np.ndarray | None = None):
        self.keep = keep  # R - 1
        self.position = position
        self.tail = tail if tail is not None else np.zeros((0, 0), dtype=np.float32)

    def record(self, rows: np.ndarray) -> None:
        if self.keep == 0:
            self.tail = rows[:0]
        elif len(self.tail) == 0 or len(rows) >= self.keep:
            self.tail = rows[-self.keep :].copy()
        else:
            self.tail = np.concatenate([self.tail, rows])[-self.keep :]
        self.position += len(rows)

    def reset(self) -> None:
        self.position, self.tail = 0, self.tail[:0]

    def snapshot(self) -> dict:
        return {"position": self.position, "inputs": self.tail.tolist()}


@dataclass
class SessionRef:
    """The protocol's view of one session."""

    id: str
    model: str
    tracker: Tracker
    ttl_s: float | None = None
    embedding: list[float] | None = None  # a conditioned model's: sent again on a restore


def request(call: Call, policy: RetryPolicy, ok: tuple[int, ...] = (200,)) -> Flow:
    """One request, retried on transport failures and retryable statuses."""
    last = None
    for attempt in range(policy.attempts):
        try:
            reply = yield call
        except TransportFailure:
            yield Wait(policy.delay(attempt))
            continue
        if reply.status in ok:
            return reply
        if reply.status in RETRYABLE:
            last = reply
            yield Wait(policy.delay(attempt, reply))
            continue
        raise ServerError.from_reply(reply)
    raise RetriesExhausted(f"{call.method} {call.path}", policy.attempts, last)


def embedding_values(embedding: Any) -> list[float] | None:
    """A session's (or a sequence's) embedding as the JSON list the server takes: one vector,
    or one per embedding_dims entry, concatenated."""
    if embedding is None:
        return None
    if isinstance(embedding, (list, tuple)) and any(np.ndim(part) for part in embedding):
        embedding = np.concatenate([np.ravel(part) for part in embedding])
    return np.asarray(embedding, dtype=np.float64).ravel().tolist()


def predict_body(
    shape: ModelShape, sequences: Iterable[Any], outputs: str, embeddings: Any
) -> dict[str, Any]:
    """POST /v1/models/{m}/predict's body; `embeddings`: one per sequence (a conditioned
    model's)."""
    body: dict[str, Any] = {"inputs": [shape.rows(s).tolist() for s in sequences]}
    body["outputs"] = outputs
    if embeddings is not None:
        body["embeddings"] = [embedding_values(e) for e in embeddings]
    return body


def open_session(
    model: str,
    prefix: np.ndarray | None,
    session_id: str | None,
    ttl_s: float | None,
    keep: int,
    policy: RetryPolicy,
    embedding: Any = None,
) -> Flow:
    """Create a session (with its own id, so a retry after a lost reply is recognised)."""
    chosen = session_id is not None
    vector = embedding_values(embedding)
    ref = SessionRef(session_id or new_session_id(), model, Tracker(keep), ttl_s, vector)
    body: dict[str, Any] = {"model": model, "session_id": ref.id}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    if vector is not None:
        body["embedding"] = vector
    if prefix is not None and len(prefix):
        body["prefix"] = prefix.tolist()
    last = None
    for attempt in range(policy.attempts):
        try:
            reply = yield Call("POST", "/v1/sessions", body, ref.id)
        except TransportFailure:
            yield Wait(policy.delay(attempt))
            continue
        if reply.status == 409 and attempt > 0 and not chosen:
            # Our earlier try was applied but its reply lost (a generated id collides with
            # nothing else): start over, to get the prefix outputs.
            yield from request(
                Call("DELETE", f"/v1/sessions/{ref.id}", None, ref.id), policy, ok=(204, 404, 410)
            )
            continue
        if reply.status in RETRYABLE:
            last = reply
            yield Wait(policy.delay(attempt, reply))
            continue
        if reply.status != 201:
            raise ServerError.from_reply(reply)
        outputs = reply.body.get("outputs") or []
        if prefix is not None and len(prefix):
            ref.tracker.record(prefix)
        return ref, outputs
    raise RetriesExhausted("POST /v1/sessions", policy.attempts, last)


def restore(ref: SessionRef, policy: RetryPolicy) -> Flow:
    """Re-create a lost session, same id, from the kept inputs at the client's position."""
    body: dict[str, Any] = {
        "model": ref.model,
        "session_id": ref.id,
        "snapshot": ref.tracker.snapshot(),
    }
    if ref.ttl_s is not None:
        body["ttl_s"] = ref.ttl_s
    if ref.embedding is not None:
        body["embedding"] = ref.embedding
    reply = yield from request(Call("POST", "/v1/sessions", body, ref.id), policy, ok=(201, 409))
    if reply.status == 409:  # it exists again (a concurrent restore): make sure it matches us
        yield from resync(ref, 0, policy)


def rebuild(ref: SessionRef, policy: RetryPolicy) -> Flow:
    """Replace the server's session with one rebuilt at the client's position."""
    path = f"/v1/sessions/{ref.id}"
    yield from request(Call("DELETE", path, None, ref.id), policy, ok=(204, 404, 410))
    yield from restore(ref, policy)


def resync(ref: SessionRef, pending: int, policy: RetryPolicy) -> Flow:
    """After an uncertain failure: make the server's session agree with the client's position.

    The server may also be exactly `pending` rows ahead: the push in flight was applied and
    its retry (same offset) is answered with the stored response. Anything else is rebuilt.
    """
    path = f"/v1/sessions/{ref.id}"
    reply = yield from request(Call("GET", path, None, ref.id), policy, ok=(200, 404, 410))
    if reply.status in (404, 410):
        yield from restore(ref, policy)
    elif reply.body.get("position") not in (ref.tracker.position, ref.tracker.position + pending):
        yield from rebuild(ref, policy)


def settle_conflict(ref: SessionRef, uncertain: bool, policy: RetryPolicy) -> Flow:
    """The server refused our offset: make its session agree with the client's position.

    After an uncertain failure, the server moved on without us: rebuild at once. Otherwise the
    server is ahead by a push we never saw answered (a cancelled push, a stale session on a
    failed-over replica): since the client is the only writer of its session, look at the
    server's position and rebuild from the kept inputs if it is not ours.
    """
    if uncertain:
        yield from rebuild(ref, policy)
    else:
        yield from resync(ref, 0, policy)


def push(ref: SessionRef, rows: np.ndarray, policy: RetryPolicy) -> Flow:
    """Apply rows at the client's position: retried, idempotent, and restored if lost.

    The client assumes it is the only writer of its session: an offset conflict means the
    server's session is not where the client's is (a push cancelled after it was sent, a stale
    replica), so the session is resynced (rebuilt at the client's position if need be) and the
    push retried. A conflict right after that raises `ServerError` (409 offset_conflict).
    """
    body = {"inputs": rows.tolist(), "offset": ref.tracker.position}
    call = Call("POST", f"/v1/sessions/{ref.id}/steps", body, ref.id)
    last, settled = None, False
    for attempt in range(policy.attempts):
        try:
            reply = yield call
        except TransportFailure:
            settled = False
            yield Wait(policy.delay(attempt))
            continue
        if reply.status == 200:
            ref.tracker.record(rows)
            return reply.body["outputs"]
        if reply.status in (404, 410):
            yield from restore(ref, policy)
            continue
        if reply.status == 409 and not settled:
            settled = True
            yield from settle_conflict(ref, attempt > 0, policy)
            continue
        if reply.status in RETRYABLE:
            last = reply
            yield Wait(policy.delay(attempt, reply))
            continue
        raise ServerError.from_reply(reply)
    raise RetriesExhausted(f"push to session {ref.id}", policy.attempts, last)


def many_items(pairs: list[tuple[Any, Any]]) -> list[tuple[SessionRef, np.ndarray]]:
    """(session, rows) pairs of a client's push_many -> the protocol's items."""
    ids = [session.id for session, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError("push_many: each session at most once per call")
    return [(session._ref, session._shape.rows(rows)) for session, rows in pairs]


def first_error(results: list) -> None:
    """Raise the first error among push_many's results, if any."""
    for result in results:
        if isinstance(result, Exception):
            raise result


# Items per POST /v1/steps request: under the server's default max_sequences_per_request.
MANY_CHUNK = 1000
LOST = ("session_not_found", "session_expired")


def push_many(
    items: list[tuple[SessionRef, np.ndarray]], policy: RetryPolicy
) -> Generator[Any, Any, list[np.ndarray | Exception]]:
    """Push rows to many sessions with one POST /v1/steps per MANY_CHUNK items.

    Each item is pushed at its client's position, exactly as `push` would: lost sessions are
    restored and conflicts settled, then only those items are sent again. Returns, per item,
    its (T, out) outputs or the error it ended with (ServerError, RetriesExhausted).
    """
    results: list[np.ndarray | Exception | None] = [None] * len(items)
    for start in range(0, len(items), MANY_CHUNK):
        todo = list(range(start, min(start + MANY_CHUNK, len(items))))
        settled: set[int] = set()
        for attempt in range(policy.attempts):
            steps = [
                {"session_id": ref.id, "inputs": rows.tolist(), "offset": ref.tracker.position}
                for ref, rows in (items[i] for i in todo)
            ]
            try:
                reply = yield Call("POST", "/v1/steps", {"steps": steps})
            except TransportFailure:  # retried with the same offsets: applied items replay
                yield Wait(policy.delay(attempt))
                continue
            if reply.status in RETRYABLE:
                yield Wait(policy.delay(attempt, reply))
                continue
            if reply.status != 200:
                raise ServerError.from_reply(reply)
            again, busy = [], False
            for i, result in zip(todo, reply.body["results"], strict=True):
                ref, rows = items[i]
                error = result.get("error")
                if error is None:
                    ref.tracker.record(rows)
                    results[i] = np.asarray(result["outputs"], dtype=np.float32)
                    continue
                code = error.get("code", "error")
                if code in LOST:
                    yield from restore(ref, policy)
                    again.append(i)
                elif code == "offset_conflict" and i not in settled:
                    settled.add(i)
                    yield from settle_conflict(ref, attempt > 0, policy)
                    again.append(i)
                elif code in error_codes.RETRYABLE:
                    busy = True
                    again.append(i)
                else:
                    status = error_codes.STATUS.get(code, 400)
                    results[i] = ServerError(status, code, error.get("message", ""), result)
            todo = again
            if not todo:
                break
            if busy:
                yield Wait(policy.delay(attempt))
        for i in todo:
            results[i] = RetriesExhausted(f"push to session {items[i][0].id}", policy.attempts)
    return results  # type: ignore[return-value]


# ----- WebSocket streaming -------------------------------------------------------------------


@dataclass(frozen=True)
class WsSend:
    """Send one message on the session's socket, connecting first if there is none."""

    data: bytes | str


@dataclass(frozen=True)
class WsRecv:
    """Receive the next message (bytes or str) from the session's socket."""


@dataclass(frozen=True)
class WsClose:
    """Drop the session's socket (it may still carry an answer to something else)."""


class SocketClosed(Exception):
    """The socket closed (or never opened); `code` is the close code, None if unknown."""

    def __init__(self, code: int | None, reason: str = ""):
        super().__init__(f"websocket closed ({code}): {reason}")
        self.code, self.reason = code, reason


CLOSE_UNAUTHORIZED, CLOSE_NOT_FOUND, CLOSE_EXPIRED = 4401, 4404, 4410
# Close codes that retrying cannot fix, as the HTTP error the same request would get.
FINAL_CLOSES = {
    1009: (413, "body_too_large"),  # a message over the server's max_body_bytes
    4400: (400, "bad_request"),
    CLOSE_UNAUTHORIZED: (401, "unauthorized"),
}


def stream_push(ref: SessionRef, rows: np.ndarray, binary: bool, policy: RetryPolicy) -> Flow:
    """Push rows over the session's socket and return their outputs, surviving lost sockets.

    Frames always carry the offset, so a resend after a reconnect is idempotent like HTTP.
    Every answer carries the session's position after it (binary: the frame header; JSON:
    "position"); one that is not offset + len(rows) answers some other push (one whose
    caller was cancelled, say), so the socket is dropped and the session resynced as after
    a lost connection; its outputs are never returned nor its rows recorded. Offset conflicts
    are settled as in `push` (the client assumes it is the only writer of its session).
    """
    settled = False
    for attempt in range(policy.attempts):
        offset = ref.tracker.position
        expected = offset + len(rows)
        if binary:
            message: bytes | str = encode_frame(rows, offset)
        else:
            message = json.dumps({"inputs": rows.tolist(), "offset": offset})
        try:
            yield WsSend(message)
            answer = yield WsRecv()
            if isinstance(answer, bytes):  # check the header first: the rest may not fit us
                body = None
                position = HEADER.unpack_from(answer)[0] if len(answer) >= HEADER.size else None
            else:
                body = json.loads(answer)
                error = body.get("error") if isinstance(body, dict) else None
                if error is not None:
                    position = expected  # an error answers this push (or closes the socket)
                else:
                    position = body.get("position") if isinstance(body, dict) else None
            if position != expected:
                yield WsClose()
                raise SocketClosed(None, f"answer at position {position}, expected {expected}")
        except SocketClosed as closed:
            settled = False
            if closed.code in FINAL_CLOSES:
                status, code = FINAL_CLOSES[closed.code]
                raise ServerError(status, code, closed.reason) from None
            yield Wait(policy.delay(attempt))
            if closed.code in (CLOSE_NOT_FOUND, CLOSE_EXPIRED):
                yield from restore(ref, policy)
            else:  # dropped mid-push: the push may or may not have been applied
                yield from resync(ref, len(rows), policy)
            continue
        if body is None:
            _, outputs = decode_frame(answer, _width(answer, len(rows)), with_header=True)
            ref.tracker.record(rows)
            return outputs
        if error is None:
            ref.tracker.record(rows)
            return np.asarray(body["outputs"], dtype=np.float32)
        if error.get("code") == "offset_conflict" and not settled:
            settled = True
            yield from settle_conflict(ref, attempt > 0, policy)
            continue
        code = error.get("code", "error")
        if code in error_codes.RETRYABLE:
            yield Wait(policy.delay(attempt))
            continue
        # Raised like its HTTP twin: the status the same push over HTTP would get.
        status = error_codes.STATUS.get(code, 400)
        raise ServerError(status, code, error.get("message", ""), body)
    raise RetriesExhausted(f"stream to session {ref.id}", policy.attempts)


def _width(frame: bytes, rows: int) -> int:
    """Output width of a server frame answering `rows` rows (header + rows x width float32)."""
    return (len(frame) - HEADER.size) // (rows * ROW_DTYPE.itemsize)


# ----- shared by both clients ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the client needs to know of a model: row width, row dtype, history to keep."""

    name: str
    width: int  # values per input row (1 for a token model: its id)
    tokens: bool
    receptive_field: int

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ModelShape:
        tokens = info.get("vocab_size") is not None
        width = 1 if tokens else int(info["in_channels"])
        return cls(info["name"], width, tokens, int(info["receptive_field"]))

    def rows(self, rows: Any) -> np.ndarray:
        """Rows as a (T, width) array (float32, or int64 token ids)."""
        dtype = np.int64 if self.tokens else np.float32
        array = np.asarray(rows, dtype=dtype)
        if array.ndim == 1 and self.width == 1:
            array = array[:, None]
        if array.ndim != 2 or array.shape[1] != self.width or len(array) == 0:
            raise ValueError(
                f"model {self.name!r} takes rows of {self.width} values, got {array.shape}"
            )
        if not self.tokens and not np.isfinite(array).all():
            raise ValueError("rows must be finite numbers (no NaN or Inf)")
        return array


class ClientBase:
    """What both clients hold: where the server is, how to authenticate, how to retry."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        retry: RetryPolicy | None,
        keep_sessions: bool = False,
    ):
        self.base_url = check_base_url(base_url)
        self.api_key = api_key
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        # Sessions this client opened and has not closed: closed with it, unless kept (then
        # they live on the server until their TTL, for another process to resume by id).
        self.keep_sessions = keep_sessions
        self._opened: dict[str, Any] = {}
        self._shapes: dict[str, ModelShape] = {}

    def _left_open(self) -> list[Any]:
        """The sessions `close` deletes: none when they are kept."""
        left = [] if self.keep_sessions else list(self._opened.values())
        self._opened.clear()
        return left


class SessionBase:
    """What both session classes expose: identity, position, and the prefix's outputs."""

    def __init__(self, ref: SessionRef, shape: ModelShape, prefix_outputs: Any):
        self._ref, self._shape = ref, shape
        self.prefix_outputs = np.asarray(prefix_outputs, dtype=np.float32)

    @property
    def id(self) -> str:
        return self._ref.id

    @property
    def model(self) -> str:
        return self._ref.model

    @property
    def position(self) -> int:
        """Rows the server has answered for this session."""
        return self._ref.tracker.position

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sessions/{self._ref.id}{suffix}"


def check_base_url(base_url: str) -> str:
    """The server URL without a trailing slash; a malformed one is refused at once (ValueError)
    rather than retried like an unreachable server."""
    parts = urlsplit(base_url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ValueError(f"server URL {base_url!r} must look like http://HOST[:PORT] (or https://)")
    return base_url.rstrip("/")


def websocket_url(base_url: str, session_id: str) -> str:
    scheme, rest = base_url.rstrip("/").split("://", 1)
    ws = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{ws}://{rest}/v1/sessions/{session_id}/stream?framing=offset"


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def batches(rows: Iterable[Any], size: int) -> Iterator[list]:
    """Group an iterable of rows into lists of `size` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk must be >= 1, got {size}")
    batch: list = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
