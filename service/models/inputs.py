"""Decode request bodies straight from bytes into arrays, at a cost linear in their size.

Bodies are parsed by msgspec against strict types: a number is never a string or a bool, unknown
fields are refused, and the first problem ends the parse with one clear message, so an invalid
body costs at most one pass over its bytes up to that problem (no per-item error lists). Rows are
fixed-width tuples of the model's `in_channels` numbers, so a row of the wrong width fails at that
row. Valid rows are Python floats for a moment before they become one numpy array per sequence:
about 30x the body's size transiently (measured), which max_body_bytes bounds and the single
decode thread (service/engine/runtime.py) keeps to one large body at a time.

The envelope of each body is decoded first with its rows left as raw JSON (`msgspec.Raw`), so
the rows can be decoded for the model the request names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np

from model import MAX_POSITION
from service.protocol import json_bounds
from service.protocol.errors import InvalidInput, ServiceError, TooManySequences, TooManyTimesteps
from service.protocol.limits import SESSION_ID_PATTERN, RequestLimits

S = TypeVar("S")
Position = Annotated[int, msgspec.Meta(ge=0, le=MAX_POSITION)]
SessionId = Annotated[str, msgspec.Meta(pattern=SESSION_ID_PATTERN)]


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    @staticmethod
    def counts(limits: RequestLimits) -> tuple[json_bounds.Count, ...]:
        """What the body's depths hold, bounded before it is parsed (protocol/json_bounds.py)."""
        return ()


class PredictBody(_Body):
    inputs: msgspec.Raw
    outputs: Literal["all", "last"] = "all"
    embeddings: msgspec.Raw = msgspec.Raw()  # one per sequence, for a conditioned model

    @staticmethod
    def counts(limits: RequestLimits) -> tuple[json_bounds.Count, ...]:
        # {"inputs": [[row, ...], ...]}: sequences at depth 3, their rows at depth 4; the
        # embeddings (one per sequence) are depth-3 containers too, hence twice the sequences
        # here (the route counts the sequences themselves once decoded)
        return (
            json_bounds.Count(3, 2 * limits.max_sequences, SEQUENCES, limits.max_sequences),
            json_bounds.Count(4, limits.max_timesteps, TIMESTEPS),
        )


class SnapshotBody(_Body):
    position: Position
    inputs: msgspec.Raw
    session_id: str | None = None  # present when a GET .../snapshot body is posted back
    model: str | None = None
    embedding: msgspec.Raw = msgspec.Raw()  # a conditioned model's session's; see `embeddings`


class CreateBody(_Body):
    model: str = "default"
    session_id: SessionId | None = None
    ttl_s: float | None = None
    prefix: msgspec.Raw = msgspec.Raw()  # empty when absent; see `given`
    snapshot: SnapshotBody | None = None
    embedding: msgspec.Raw = msgspec.Raw()  # a conditioned model's session's; see `embeddings`

    @staticmethod
    def counts(limits: RequestLimits) -> tuple[json_bounds.Count, ...]:
        # prefix rows at depth 3 (a snapshot's `inputs` too: never both), its rows at 4
        return (
            json_bounds.Count(3, limits.max_timesteps, TIMESTEPS),
            json_bounds.Count(4, limits.max_timesteps, TIMESTEPS),
        )


class StepBody(_Body):
    inputs: msgspec.Raw
    offset: Position | None = None

    @staticmethod
    def counts(limits: RequestLimits) -> tuple[json_bounds.Count, ...]:
        return (json_bounds.Count(3, limits.max_timesteps, TIMESTEPS),)  # {"inputs": [row]}


class ManyStep(_Body):
    """One item of POST /v1/steps: a push to one session. Its rows and offset are checked per
    item (a bad item fails alone), so both stay raw here."""

    session_id: str
    inputs: msgspec.Raw
    offset: msgspec.Raw = msgspec.Raw()  # absent or null: no offset


class ManyStepsBody(_Body):
    steps: list[ManyStep]

    @staticmethod
    def counts(limits: RequestLimits) -> tuple[json_bounds.Count, ...]:
        # {"steps": [{...}, ...]}: items at depth 3. An item's rows fail that item alone, so
        # they are bounded when it is decoded (`rows`, max_rows).
        return (json_bounds.Count(3, limits.max_sequences, ITEMS),)


def offset(raw: msgspec.Raw, what: str = "offset") -> int | None:
    """An optional raw offset -> None or an int in [0, MAX_POSITION]."""
    if not given(raw):
        return None
    return decode_body(raw, Position, what)


def check_offset(offset: int | None, what: str = "offset") -> int | None:
    """An offset from a binary frame's header: None, or an int in [0, MAX_POSITION]."""
    if offset is not None and not 0 <= offset <= MAX_POSITION:
        raise InvalidInput(f"{what} must be in [0, {MAX_POSITION}], got {offset}")
    return offset


def embeddings(raw: msgspec.Raw, spec: InputSpec, what: str, one: bool) -> list | None:
    """A body's raw `embedding` (`one`) or `embeddings` (one per sequence) -> lists of floats,
    decoded against the model's width, so a wrong length fails at its value past the width
    (the body's counts bound how many); None when absent. Whether the model needs one is
    `embedding`'s to say."""
    if not given(raw):
        return None
    if not spec.embedding_width:
        raise _no_embedding(what)
    try:
        return _embedding_decoder(spec.embedding_width, one).decode(raw)
    except msgspec.ValidationError as e:
        hint = f"an embedding is {spec.embedding_width} numbers"
        raise InvalidInput(located(str(e), what, hint)) from None
    except msgspec.DecodeError as e:
        raise InvalidInput(_malformed(e, raw, what)) from None


def _no_embedding(what: str) -> InvalidInput:
    return InvalidInput(f"{what}: this model takes no embedding (embedding_dims null)")


@functools.cache
def _embedding_decoder(width: int, one: bool) -> msgspec.json.Decoder:
    vector: Any = tuple[(float,) * width]  # type: ignore[misc]
    return msgspec.json.Decoder(vector if one else list[vector])  # type: ignore[valid-type]


def embedding(
    values: list[float] | None, dims: tuple[int, ...] | None, what: str = "embedding"
) -> np.ndarray | None:
    """A session's (or a /predict sequence's) embedding -> (E,) float64, or None for a model
    without embeddings; InvalidInput when a conditioned model gets none, an unconditioned one
    gets one, or it is not sum(embedding_dims) finite values. (The pool also bounds its
    magnitude for the model's dtype.)"""
    if dims is None:
        if values is not None:
            raise _no_embedding(what)
        return None
    width = sum(dims)
    if values is None:
        raise InvalidInput(
            f"{what}: this model is conditioned on an embedding of {width} values per stream "
            f'(embedding_dims {list(dims)}), never taken as zeros: give "embedding" when a '
            "session opens (POST /v1/sessions; a WebSocket then attaches with "
            '/v1/sessions/{id}/stream) and "embeddings" in POST /v1/models/{name}/predict; '
            "/v2 and gRPC requests carry none"
        )
    e = np.asarray(values, dtype=np.float64)
    if e.shape != (width,):
        raise InvalidInput(
            f"{what}: expected {width} values (embedding_dims {list(dims)}), got {len(values)}"
        )
    if not np.isfinite(e).all():
        raise InvalidInput(f"{what}: values must be finite (no NaN or Inf)")
    return e


def given(raw: msgspec.Raw) -> bool:
    """Whether an optional raw field was sent with a value (absent or null: no)."""
    return len(raw) > 0 and bytes(raw).strip() != b"null"


@dataclass(frozen=True)
class InputSpec:
    """What one model takes: rows of `width` floats (or one token id each), within `max_abs`."""

    width: int
    vocab_size: int | None
    dtype: np.dtype  # of float rows: the served dtype's numpy counterpart
    max_abs: float  # larger magnitudes could overflow inside the model (model/numeric_range.py)
    embedding_width: int = 0  # a conditioned model's values per embedding; 0: it takes none


@functools.cache
def _envelope(kind: type[S]) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(kind)


@functools.cache
def _rows_decoder(width: int, tokens: bool, nested: bool) -> msgspec.json.Decoder:
    # Token ids are read as numbers and checked to be integers afterwards, so 3.0 is id 3.
    row: Any = tuple[float] if tokens else tuple[(float,) * width]  # type: ignore[misc]
    rows = list[row]  # type: ignore[valid-type]
    return msgspec.json.Decoder(list[rows] if nested else rows)  # type: ignore[valid-type]


def decode_body(
    data: bytes | msgspec.Raw, kind: type[S], what: str = "", limits: RequestLimits | None = None
) -> S:
    """JSON bytes -> a body struct; InvalidInput names the first problem. Its depth, and with
    `limits` the counts of the body `kind` (`_Body.counts`), are checked before it is parsed."""
    counts = kind.counts(limits) if limits is not None else ()  # type: ignore[attr-defined]
    check_shape(data, counts, what)
    try:
        return _envelope(kind).decode(data)
    except msgspec.ValidationError as e:
        raise InvalidInput(located(str(e), what)) from None
    except msgspec.DecodeError as e:
        raise InvalidInput(_malformed(e, data, what)) from None


# Refusals of a body's shape: the error, and what its message says of the limit.
SEQUENCES, TIMESTEPS, ITEMS = "sequences", "timesteps", "items"
_REFUSALS: dict[str, tuple[type[ServiceError], str, str]] = {
    SEQUENCES: (TooManySequences, "sequences", "max_sequences_per_request"),
    TIMESTEPS: (TooManyTimesteps, "timesteps", "max_timesteps_per_request"),
    ITEMS: (TooManySequences, "items", "max_sequences_per_request"),
}


def check_shape(
    data: bytes | msgspec.Raw, counts: tuple[json_bounds.Count, ...], what: str = ""
) -> None:
    """Refuse JSON nested deeper than json_bounds.MAX_DEPTH or with more containers at a depth
    than `counts` allow, before any of it is parsed."""
    text = data if isinstance(data, bytes) else bytes(data)
    # Openers counted at C speed: a body with few containers (a streamed step: ~100 ns) can
    # pass no bound, and skips the scan.
    openers = text.count(b"[") + text.count(b"{")
    if openers <= json_bounds.MAX_DEPTH and all(openers <= c.limit for c in counts):
        return
    exceeded = json_bounds.check(text, counts)
    if exceeded is None:
        return
    if exceeded.count is None:
        raise InvalidInput(_too_deep(what))
    error, things, setting = _REFUSALS[exceeded.count.what]
    limit = exceeded.count.shown or exceeded.count.limit
    raise error(
        f"the request has more than {limit} {things}; at most {limit} per request ({setting}): "
        "split it into several requests"
    )


def _too_deep(what: str) -> str:
    return (
        f"{what or 'body'}: JSON nested more than {json_bounds.MAX_DEPTH} levels deep (no "
        "body of this API nests that deep)"
    )


def rows(
    raw: msgspec.Raw,
    spec: InputSpec,
    what: str,
    allow_empty: bool = False,
    max_rows: int | None = None,
) -> np.ndarray:
    """JSON rows -> (T, width) floats, or (T,) int64 ids for a token model; T >= 1 unless
    allow_empty (a snapshot at position 0). More than `max_rows` rows are refused before any is
    parsed (rows of a body whose own counts did not bound them: an item of /v1/steps)."""
    if max_rows is not None:
        check_shape(raw, (json_bounds.Count(2, max_rows, TIMESTEPS),), what)
    decoded = _decode_rows(raw, spec, what, nested=False)
    if not decoded and allow_empty:
        shape = (0,) if spec.vocab_size is not None else (0, spec.width)
        return np.zeros(shape, dtype=np.int64 if spec.vocab_size is not None else spec.dtype)
    return _to_array(decoded, spec, what)


def rows_many(
    raws: list[msgspec.Raw], spec: InputSpec, what: str, max_rows: int | None = None
) -> list[np.ndarray | ServiceError]:
    """`rows` for the items of many pushes to one float model (POST /v1/steps): each its
    array or the error `rows` would give it. The items are parsed together, and when they
    carry as many rows each, they become one array with one range check; an item of a parse
    or a check that fails is decoded again alone, for its own error."""
    out: list[np.ndarray | ServiceError | None] = [None] * len(raws)
    bound = (json_bounds.Count(2, max_rows, TIMESTEPS),) if max_rows is not None else ()
    good: list[int] = []
    for k, raw in enumerate(raws):
        # Each row takes 2 bytes at least ("[]"): an item this short cannot hold too many.
        if max_rows is not None and len(raw) > 2 * max_rows:
            try:
                check_shape(raw, bound, what)
            except ServiceError as e:
                out[k] = e
                continue
        good.append(k)
    try:
        decoded = _rows_decoder(spec.width, False, nested=True).decode(
            b"[" + b",".join([raws[k] for k in good]) + b"]"
        )
    except msgspec.MsgspecError:  # some item is bad: each alone, for its own message
        decoded = None
    if decoded and decoded[0] and len({len(d) for d in decoded}) == 1:  # as many rows each
        x = np.array(decoded, dtype=np.float64)  # (items, T, C)
        if -spec.max_abs <= float(x.min()) and float(x.max()) <= spec.max_abs:
            for k, part in zip(good, x.astype(spec.dtype, copy=False), strict=True):
                out[k] = part
            return out  # type: ignore[return-value]
    for j, k in enumerate(good):
        try:
            out[k] = (
                _to_array(decoded[j], spec, what)
                if decoded is not None
                else rows(raws[k], spec, what)
            )
        except ServiceError as e:
            out[k] = e
    return out  # type: ignore[return-value]


def sequences(raw: msgspec.Raw, spec: InputSpec, what: str) -> list[np.ndarray]:
    """JSON list of sequences -> one array per sequence (see `rows`); at least one."""
    decoded = _decode_rows(raw, spec, what, nested=True)
    if not decoded:
        raise InvalidInput(f"{what}: give at least one sequence")
    return [_to_array(seq, spec, f"{what}[{i}]") for i, seq in enumerate(decoded)]


def check_array(x: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """Already-decoded (T, width) float32 rows (a binary frame): shape, range, dtype."""
    if spec.vocab_size is not None:
        raise InvalidInput(
            f"{what}: binary frames carry float32 rows; this model takes token ids, so send "
            "text frames"
        )
    if x.ndim != 2 or x.shape[1] != spec.width or len(x) == 0:
        raise InvalidInput(f"{what}: expected rows of {spec.width} values, got shape {x.shape}")
    _check_range(x, spec, what)
    return x.astype(spec.dtype, copy=False)


def _decode_rows(raw: msgspec.Raw, spec: InputSpec, what: str, nested: bool) -> list:
    try:
        return _rows_decoder(spec.width, spec.vocab_size is not None, nested).decode(raw)
    except msgspec.ValidationError as e:
        raise InvalidInput(located(str(e), what, _row_hint(spec))) from None
    except msgspec.DecodeError as e:
        raise InvalidInput(_malformed(e, raw, what)) from None


def _to_array(decoded: list, spec: InputSpec, what: str) -> np.ndarray:
    if not decoded:
        raise InvalidInput(f"{what}: give at least one row")
    if spec.vocab_size is not None:
        values = np.array(decoded, dtype=np.float64).reshape(len(decoded))  # (T,)
        fractional = values != np.floor(values)
        if fractional.any():
            t = int(np.argmax(fractional))
            raise InvalidInput(f"{what}: row {t} must be one integer token id, like [3]")
        bad = (values < 0) | (values >= spec.vocab_size)
        if bad.any():
            t = int(np.argmax(bad))
            raise InvalidInput(
                f"{what}: row {t}: token id {values[t]:.0f} is outside [0, {spec.vocab_size})"
            )
        return values.astype(np.int64)
    x = np.array(decoded, dtype=np.float64).reshape(len(decoded), spec.width)  # (T, C)
    _check_range(x, spec, what)
    return x.astype(spec.dtype, copy=False)


_FEW_VALUES = 16


def _check_range(x: np.ndarray, spec: InputSpec, what: str) -> None:
    bound = spec.max_abs
    if x.size <= _FEW_VALUES:  # a row or two (a streamed step): Python beats two reductions
        if all(-bound <= v <= bound for v in x.ravel().tolist()):  # NaN fails both
            return
    # Two reductions decide the common case: NaN fails both comparisons, Inf the bound.
    elif -bound <= float(x.min()) and float(x.max()) <= bound:
        return
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what}: values must be finite (no NaN or Inf)")
    if x.size and float(np.abs(x).max()) > spec.max_abs:
        t = int(np.argmax(np.abs(x).max(axis=1) > spec.max_abs))
        raise InvalidInput(
            f"{what}: row {t} has a value beyond +-{spec.max_abs:.3g}, the largest magnitude "
            "this model takes without overflowing"
        )


def _malformed(error: msgspec.DecodeError, data: bytes | msgspec.Raw, what: str) -> str:
    """The parser's message, or a clearer one for the NaN/Infinity some encoders write."""
    text = str(error)
    _, sep, tail = text.partition("(byte ")
    if sep and tail.rstrip(")").isdigit():
        at = int(tail.rstrip(")"))
        near = bytes(memoryview(data)[at : at + 9]).lstrip(b"-")
        if near.startswith((b"NaN", b"Infinity", b"inf", b"nan")):
            return (
                f"{what or 'body'}: values must be finite numbers (NaN and Infinity are not "
                f"JSON): {text}"
            )
    return f"{what or 'body'}: {text}"


def _row_hint(spec: InputSpec) -> str:
    if spec.vocab_size is not None:
        return "each row is one integer token id, like [3]"
    return f"each row is {spec.width} numbers"


def located(message: str, what: str, hint: str = "") -> str:
    """msgspec's 'Problem - at `$.a[0]`' -> 'what.a[0]: Problem', plus a hint for rows."""
    text, sep, path = message.rpartition(" - at `")
    if not sep:
        text, path = message, "$`"
    location = (what + path.rstrip("`").removeprefix("$")).removeprefix(".") or "body"
    return f"{location}: {text}" + (f" ({hint})" if hint else "")
