"""The Open Inference Protocol v2 ("KServe v2") on HTTP: infer requests in, responses out.

Pure codec, no HTTP framework and no model: bytes (and the Inference-Header-Content-Length
header) become one `InferRequest` holding a numpy array, and outputs become response bytes.

A model has one input, `input`: FP32 [batch, time, in_channels] (token models: INT64 [batch,
time] of ids), and one output, `output`: FP32 [batch, time, out_channels]. Tensor data comes
either as JSON `data` (flat in row-major order, or nested as the shape) or, with the binary
tensor data extension, as raw little-endian bytes after the JSON header.

Memory stays linear in the body with a small constant: JSON numbers are never all turned into
Python floats at once. The brackets and commas of `data` are checked against the shape first
(a translated copy of the text), then the numbers are parsed by msgspec in chunks of about
16 KiB straight into one preallocated array of the protocol's dtype (4 bytes per FP32 number,
where a number takes at least 2 bytes of text). Measured peaks (tests/service/test_oip.py): about
3.6x the body for the worst case, `[0,0,0,...]`, 2x for ordinary numbers, 1.25x for binary data,
and at most about 7x for hostile envelopes (thousands of inputs or shape entries, built by
msgspec before their count is refused).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import numpy as np

from model import MAX_POSITION
from service.models import inputs
from service.protocol.errors import InvalidInput, ModelNotFound, TooManySequences, TooManyTimesteps
from service.protocol.limits import RequestLimits, header_int

if TYPE_CHECKING:
    from service.models.registry import ModelEntry, ModelRegistry

INPUT = "input"
OUTPUT = "output"
VERSION = "1"  # every served model has exactly this one version
PLATFORM = "tcnserve_pytorch"
EXTENSIONS = ("binary_tensor_data", "sequence", "statistics")
INFERENCE_HEADER = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"
# Numpy dtypes of the protocol's datatypes: FP32 for float inputs and outputs, INT64 for ids.
DTYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}
MAX_SEQUENCE_ID = 2**64 - 1  # Triton's integer ids are unsigned 64-bit
# String sequence ids of these characters name their session as they are; any other string
# (Triton takes any) is hashed into the session id. Either way at most this many UTF-8 bytes.
SEQUENCE_STRING_RE = re.compile(r"^[A-Za-z0-9_-]{1,120}$")
MAX_SEQUENCE_STRING_BYTES = 1024
NUMBERS_CHUNK_BYTES = 16 * 1024
_NUMBER_BYTES = b" \t\r\n0123456789+-.eE"  # deleted, these leave the brackets and commas
_INDEX_RE = re.compile(r" - at `\$\[(\d+)\]`$")


class _Struct(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _SharedMemory(_Struct):
    """Parameters of the shared-memory extensions: named only to refuse them clearly."""

    shared_memory_region: msgspec.Raw = msgspec.Raw()
    shared_memory_byte_size: msgspec.Raw = msgspec.Raw()
    shared_memory_offset: msgspec.Raw = msgspec.Raw()

    def refuse_shared_memory(self, what: str) -> None:
        if inputs.given(self.shared_memory_region) or inputs.given(self.shared_memory_byte_size):
            raise InvalidInput(
                f"{what}: the shared-memory extensions are not supported (docs/oip.md); send "
                "the tensor in the body, as JSON data or binary data"
            )


class TensorParameters(_SharedMemory):
    binary_data_size: Annotated[int, msgspec.Meta(ge=0)] | None = None
    content_type: str | None = None  # KServe's codec hint: accepted, ignored


class OutputParameters(_SharedMemory):
    binary_data: bool | None = None
    classification: msgspec.Raw = msgspec.Raw()


class RequestParameters(_Struct):
    sequence_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    sequence_offset: int | None = None  # tcnserve's: the position of the request's first row
    binary_data_output: bool = False
    # Accepted and ignored (docs/oip.md): one queue serves every request, limits are the
    # server's, and the data is always the model's tensor.
    priority: int | None = None
    timeout: int | None = None
    content_type: str | None = None


Few = msgspec.Meta(max_length=8)  # more is never valid: fail before building them


class TensorIn(_Struct):
    name: str
    shape: Annotated[list[int], Few]
    datatype: str
    parameters: TensorParameters = msgspec.field(default_factory=TensorParameters)
    data: msgspec.Raw = msgspec.Raw()


class OutputIn(_Struct):
    name: str
    parameters: OutputParameters = msgspec.field(default_factory=OutputParameters)


class InferBody(_Struct):
    inputs: Annotated[list[TensorIn], Few]
    id: str | None = None
    # The KServe SDK repeats the path's model (and version) in the body: accepted when they
    # match the path, refused when they do not.
    model_name: str | None = None
    model_version: str | None = None
    parameters: RequestParameters = msgspec.field(default_factory=RequestParameters)
    outputs: Annotated[list[OutputIn], Few] | None = None


@dataclass(frozen=True)
class Sequence:
    """The sequence extension's parameters of one request."""

    id: int | str
    start: bool
    end: bool
    offset: int | None  # tcnserve's own `sequence_offset`: position of the request's first row

    @property
    def session_id(self) -> str:
        """The session that holds this sequence (docs/oip.md): `oip-int-<n>`, `oip-str-<s>` for
        a string of [A-Za-z0-9_-], else `oip-strh-<40 hex digits of its SHA-256>`.

        The prefixes keep integer 5, string "5" and hashed strings apart; all are ordinary /v1
        session ids, and sessions are per API key, so no two keys' sequences ever meet."""
        if isinstance(self.id, int):
            return f"oip-int-{self.id}"
        if SEQUENCE_STRING_RE.match(self.id):
            return f"oip-str-{self.id}"
        return f"oip-strh-{hashlib.sha256(self.id.encode()).hexdigest()[:40]}"

    def describe(self) -> str:
        return f"sequence {self.id!r}"


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    x: np.ndarray  # (B, T, C) floats of the model's dtype, or (B, T) int64 token ids
    sequence: Sequence | None
    output: bool  # whether `output` is to be returned at all
    binary_output: bool  # ...as binary data (else as JSON `data`)


# ----- metadata ----------------------------------------------------------------------------------


def model_entry(registry: ModelRegistry, name: str, version: str) -> ModelEntry:
    """The served model `name` at `version` (unnamed, "", or the one version); ModelNotFound
    for an unknown model whatever the version, or another version."""
    entry = registry.get(name)
    if version not in ("", VERSION):
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {VERSION!r}")
    return entry


def model_index(registry: ModelRegistry, draining: bool) -> list[dict[str, Any]]:
    """`GET /v2/models`: every served model, ready unless loading or draining."""
    return [
        {"name": entry.name, "versions": [VERSION], "platform": PLATFORM,
         "ready": entry.ready and not draining}
        for entry in registry.entries()
    ]  # fmt: skip


def repository_index(registry: ModelRegistry, draining: bool) -> list[dict[str, str]]:
    """Triton's repository index: each model's version and state."""
    return [
        {"name": m["name"], "version": VERSION, "state": "READY" if m["ready"] else "UNAVAILABLE"}
        for m in model_index(registry, draining)
    ]


def model_metadata(name: str, spec: inputs.InputSpec, out_channels: int) -> dict[str, Any]:
    """GET /v2/models/{name}: the one input and the one output, -1 for any batch or time."""
    if spec.vocab_size is not None:
        tensor_in = {"name": INPUT, "datatype": "INT64", "shape": [-1, -1]}
    else:
        tensor_in = {"name": INPUT, "datatype": "FP32", "shape": [-1, -1, spec.width]}
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [tensor_in],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, -1, out_channels]}],
    }


def model_config(
    name: str, spec: inputs.InputSpec, out_channels: int, max_batch: int, idle_s: float
) -> dict[str, Any]:
    """GET /v2/models/{name}/config: Triton's model configuration (its JSON form), which
    perf_analyzer and Triton's tooling read. With `max_batch_size` > 0 the dims leave out the
    batch: [time, channels]. `sequence_batching` says the model takes the sequence parameters
    (without it perf_analyzer sends none); a sequence idle longer than the session TTL ends."""
    tokens = spec.vocab_size is not None
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": "tcnserve",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch,
        "input": [
            {
                "name": INPUT,
                "data_type": "TYPE_INT64" if tokens else "TYPE_FP32",
                "dims": [-1] if tokens else [-1, spec.width],
            }
        ],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [-1, out_channels]}],
        "sequence_batching": {"max_sequence_idle_microseconds": int(idle_s * 1_000_000)},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }


# ----- requests ----------------------------------------------------------------------------------


def decode_request(
    body: bytes,
    header_length: str | None,
    spec: inputs.InputSpec,
    limits: RequestLimits,
    model: str,
) -> InferRequest:
    """An infer request's bytes -> InferRequest; InvalidInput (400) names the first problem.
    `model` is the path's: a `model_name` in the body must be the same."""
    view = memoryview(body)
    if header_length is not None:
        n = _header_length(header_length, len(body))
        envelope, binary = view[:n], view[n:]
    else:
        envelope, binary = view, view[:0]
    request = inputs.decode_body(envelope, InferBody)
    has_header = header_length is not None

    def values(tensor: TensorIn, dtype: np.dtype, count: int) -> np.ndarray:
        return _tensor_values(tensor, binary, dtype, count, has_header)

    return checked_request(request, values, spec, limits, model)


# A tensor's `count` values of `dtype`, from wherever its protocol carries them.
TensorValues = Callable[[TensorIn, np.dtype, int], np.ndarray]


def checked_request(
    request: InferBody,
    values: TensorValues,
    spec: inputs.InputSpec,
    limits: RequestLimits,
    model: str,
) -> InferRequest:
    """Every check of an infer request whatever its transport (HTTP here, gRPC in
    service/grpc/codec.py): InvalidInput names the first problem."""
    if request.model_name not in (None, model):
        raise InvalidInput(
            f"model_name {request.model_name!r} in the body differs from the path's {model!r}"
        )
    if request.model_version not in (None, "", VERSION):
        raise InvalidInput(
            f"model_version {request.model_version!r}: model {model!r} has version {VERSION!r}"
        )
    sequence, binary_output = _request_parameters(request.parameters)
    x = _input_tensor(request.inputs, values, spec, limits)
    if sequence is not None and x.shape[0] != 1:
        raise InvalidInput(
            f"input: a sequence request carries one sequence, shape [1, T, ...]; got batch "
            f"{x.shape[0]}"
        )
    output, binary_output = _requested_output(request.outputs, binary_output)
    return InferRequest(request.id, x, sequence, output, binary_output)


def _header_length(value: str, body_length: int) -> int:
    length = header_int(value)
    if length is None or not 0 < length <= body_length:
        shown = value if len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"
        raise InvalidInput(
            f"Inference-Header-Content-Length must be the byte length of the JSON header, in "
            f"[1, {body_length}] for this body, as ASCII digits; got {shown!r}"
        )
    return length


def _request_parameters(parameters: RequestParameters) -> tuple[Sequence | None, bool]:
    sequence_id = parameters.sequence_id
    start, end = parameters.sequence_start, parameters.sequence_end
    offset = parameters.sequence_offset
    if sequence_id in (None, 0, ""):  # Triton's "not part of a sequence"
        if start or end or offset is not None:
            raise InvalidInput(
                "parameters: sequence_start, sequence_end and sequence_offset need a "
                "sequence_id (a non-zero integer or a non-empty string)"
            )
        return None, parameters.binary_data_output
    if isinstance(sequence_id, int) and not 0 < sequence_id <= MAX_SEQUENCE_ID:
        raise InvalidInput("parameters.sequence_id: an integer id is in [1, 2**64 - 1]")
    if isinstance(sequence_id, str) and len(sequence_id.encode()) > MAX_SEQUENCE_STRING_BYTES:
        raise InvalidInput(
            f"parameters.sequence_id: a string id is at most {MAX_SEQUENCE_STRING_BYTES} bytes"
        )
    if offset is not None:
        if not 0 <= offset <= MAX_POSITION:
            raise InvalidInput(f"parameters.sequence_offset must be in [0, {MAX_POSITION}]")
        if start and offset != 0:
            raise InvalidInput("parameters: a sequence_start request is at sequence_offset 0")
    return Sequence(sequence_id, start, end, offset), parameters.binary_data_output


def _input_tensor(
    tensors: list[TensorIn], values: TensorValues, spec: inputs.InputSpec, limits: RequestLimits
) -> np.ndarray:
    if len(tensors) != 1 or tensors[0].name != INPUT:
        names = ", ".join(repr(t.name) for t in tensors) or "none"
        raise InvalidInput(f"inputs: this model takes one tensor named {INPUT!r}; got {names}")
    tensor = tensors[0]
    tokens = spec.vocab_size is not None
    datatype = "INT64" if tokens else "FP32"
    if tensor.datatype != datatype:
        raise InvalidInput(f"input: datatype must be {datatype}, got {tensor.datatype!r}")
    shape = tensor.shape
    want = "[batch, time]" if tokens else f"[batch, time, {spec.width}]"
    if len(shape) != (2 if tokens else 3) or (not tokens and shape[2] != spec.width):
        raise InvalidInput(f"input: shape must be {want}, got {shape}")
    if min(shape) < 1:
        raise InvalidInput(f"input: every dimension of the shape must be >= 1, got {shape}")
    batch, time = shape[0], shape[1]
    if batch > limits.max_sequences:
        raise TooManySequences(
            f"the request has {batch} sequences; at most {limits.max_sequences} per request "
            "(max_sequences_per_request)"
        )
    if batch * time > limits.max_timesteps:
        raise TooManyTimesteps(
            f"the request has {batch * time} timesteps; at most {limits.max_timesteps} per "
            "request (max_timesteps_per_request): split it into several requests"
        )
    count = math.prod(shape)
    flat = values(tensor, DTYPES[datatype], count)
    if tokens:
        bad = (flat < 0) | (flat >= spec.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidInput(
                f"input: value {i}: token id {flat[i]} is outside [0, {spec.vocab_size})"
            )
        return flat.reshape(batch, time)  # (B, T)
    _check_range(flat, spec)
    return flat.astype(spec.dtype, copy=False).reshape(batch, time, spec.width)  # (B, T, C)


def _check_range(values: np.ndarray, spec: inputs.InputSpec) -> None:
    """Finite and within the model's max_abs, without a copy of the values: a NaN makes the
    max and the min NaN, which fails the comparison, as an Inf does."""
    bound = min(spec.max_abs, float(np.finfo(values.dtype).max))  # never inf: Inf must fail
    if -bound <= float(values.min()) and float(values.max()) <= bound:
        return
    if not np.isfinite(values).all():
        raise InvalidInput(
            "input: values must be finite numbers (no NaN or Inf; FP32 holds at most 3.4e38)"
        )
    i = int(np.argmax(np.abs(values) > bound))
    raise InvalidInput(
        f"input: value {i} is beyond +-{spec.max_abs:.3g}, the largest magnitude this model "
        "takes without overflowing"
    )


def _tensor_values(
    tensor: TensorIn, binary: memoryview, dtype: np.dtype, count: int, has_header: bool
) -> np.ndarray:
    tensor.parameters.refuse_shared_memory("input.parameters")
    size = tensor.parameters.binary_data_size
    if size is None:
        if len(binary):
            raise InvalidInput(
                "the body has binary data after its JSON header, but no input says binary_data_size"
            )
        if not inputs.given(tensor.data):
            raise InvalidInput("input: give data, or binary_data_size with binary data")
        return _json_numbers(tensor.data, count, dtype, tensor.shape)
    if inputs.given(tensor.data):
        raise InvalidInput("input: give data or binary_data_size, not both")
    if not has_header:
        raise InvalidInput(
            "input.parameters.binary_data_size needs the Inference-Header-Content-Length "
            "header (the byte length of the JSON part of the body)"
        )
    expected = count * dtype.itemsize
    if size != expected:
        raise InvalidInput(
            f"input.parameters.binary_data_size is {size} bytes; shape {tensor.shape} of "
            f"{tensor.datatype} takes {expected}"
        )
    if len(binary) != size:
        raise InvalidInput(
            f"the body has {len(binary)} bytes after its JSON header; the input's "
            f"binary_data_size says {size}"
        )
    return np.frombuffer(binary, dtype=dtype).astype(dtype.newbyteorder("="))  # a copy


def _json_numbers(raw: msgspec.Raw, count: int, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """`data` as JSON, flat or nested as `shape` -> `count` numbers, in row-major order."""
    described = (
        f"input.data: expected the {count} numbers of shape {shape}, as one flat list in "
        "row-major order or as lists nested like the shape (numbers only: no strings, "
        "booleans, null, NaN or Infinity)"
    )
    if 2 * count - 1 > len(raw):  # each number takes a digit and a comma: refuse before work
        raise InvalidInput(described)
    numbers = bytes(raw)
    layout = numbers.translate(None, _NUMBER_BYTES)
    if not _layout_matches(layout, shape, count):
        raise InvalidInput(described)
    nested = layout.startswith(b"[[")
    del layout
    if nested:  # the brackets are right: drop them
        numbers = numbers.translate(None, b"[]")
        start, stop = 0, len(numbers)
    else:  # flat: parse between the outer two, in place
        start, stop = numbers.index(b"[") + 1, numbers.rindex(b"]")
    integer = dtype.kind == "i"
    decoder = _NUMBERS[integer]
    # Parsed into the protocol's dtype: a float beyond FP32 becomes inf, refused as not finite.
    out = np.empty(count, dtype=dtype.newbyteorder("="))
    filled = 0
    try:
        with np.errstate(over="ignore"):
            while start < stop:
                end = numbers.find(b",", start + NUMBERS_CHUNK_BYTES, stop)
                end = stop if end < 0 else end
                chunk = decoder.decode(b"[" + numbers[start:end] + b"]")
                out[filled : filled + len(chunk)] = chunk
                filled, start = filled + len(chunk), end + 1
    except msgspec.ValidationError as e:
        text_ = str(e)
        match = _INDEX_RE.search(text_)
        where = f" (number {filled + int(match.group(1))})" if match else ""
        raise InvalidInput(f"input.data: {_INDEX_RE.sub('', text_)}{where}") from None
    except msgspec.DecodeError as e:
        raise InvalidInput(f"input.data: not JSON numbers, near number {filled}: {e}") from None
    except (OverflowError, ValueError):
        raise InvalidInput(f"input.data: a number from {filled} on is out of range") from None
    if filled != count:
        raise InvalidInput(described)
    return out


def _layout_matches(layout: bytes, shape: list[int], count: int) -> bool:
    """Whether brackets and commas are `count` numbers, flat or nested as `shape`."""
    if not layout.startswith(b"[["):  # flat: [,,,] with count - 1 commas
        return (
            len(layout) == count + 1
            and layout[:1] == b"["
            and layout[-1:] == b"]"
            and layout.count(b",") == count - 1
        )
    # Nested, e.g. [2, 2]: [[,],[,]]; built one level at a time, without a list of the copies.
    expected = b"[" + b"," * (shape[-1] - 1) + b"]"
    for size in reversed(shape[:-1]):
        if len(expected) * size > len(layout):
            return False
        expected = b"".join((b"[", (expected + b",") * (size - 1), expected, b"]"))
    return layout == expected


_NUMBERS = {True: msgspec.json.Decoder(list[int]), False: msgspec.json.Decoder(list[float])}


def _requested_output(outputs: list[OutputIn] | None, binary_default: bool) -> tuple[bool, bool]:
    if outputs is None:
        return True, binary_default
    names = [o.name for o in outputs]
    if any(name != OUTPUT for name in names) or len(names) > 1:
        raise InvalidInput(f"outputs: this model has one output, {OUTPUT!r}; asked for {names}")
    if not outputs:
        return False, binary_default
    parameters = outputs[0].parameters
    parameters.refuse_shared_memory("outputs[0].parameters")
    if inputs.given(parameters.classification):
        raise InvalidInput("outputs[0].parameters.classification: not supported (docs/oip.md)")
    binary = parameters.binary_data
    return True, binary_default if binary is None else binary


# ----- responses ---------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def encode_response(
    model: str,
    request: InferRequest,
    y: np.ndarray,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str], str]:
    """(B, T, out) float32 outputs -> (body, headers, media type) of the infer response."""
    answer: dict[str, Any] = {"model_name": model, "model_version": VERSION}
    if request.id is not None:
        answer["id"] = request.id
    if parameters:
        answer["parameters"] = parameters
    tensors: list[dict[str, Any]] = []
    raw = b""
    if request.output:
        tensor: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(y.shape)}
        if request.binary_output:
            raw = np.ascontiguousarray(y, dtype=DTYPES["FP32"]).tobytes()
            tensor["parameters"] = {"binary_data": True, "binary_data_size": len(raw)}
        else:
            tensor["data"] = y.ravel().tolist()
        tensors.append(tensor)
    answer["outputs"] = tensors
    header = _encoder.encode(answer)
    if not request.binary_output or not request.output:
        return header, {}, "application/json"
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}, BINARY_CONTENT_TYPE
