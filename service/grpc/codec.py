"""ModelInferRequest (gRPC) -> the InferRequest every OIP edge runs, and outputs -> the
ModelInferResponse, checked by the same code as the HTTP body (service/oip/decode.py).

Tensor data comes either as raw little-endian bytes (`raw_input_contents`, one entry per input,
what tritonclient.grpc sends) or as typed lists (`contents.fp32_contents` / `int64_contents`);
outputs go back as raw bytes (`raw_output_contents`), as Triton answers.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from service.grpc import oip_pb2 as pb
from service.models import inputs
from service.oip import decode as oip
from service.protocol.errors import InvalidInput
from service.protocol.limits import RequestLimits

MAX_TENSORS = 8  # inputs or outputs a request may name (more is never valid)
MAX_DIMS = 8
# Which typed list carries a datatype's values.
CONTENTS = {"FP32": "fp32_contents", "INT64": "int64_contents"}


def parameters(entries: Any) -> dict[str, Any]:
    """A protobuf map of InferParameter -> plain values (an unset one is None)."""
    return {key: _value(p) for key, p in entries.items()}


def _value(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _convert(values: dict[str, Any], kind: type, what: str) -> Any:
    if not values:
        return kind()  # the common case: no parameters
    try:
        return msgspec.convert(values, kind)
    except msgspec.ValidationError as e:
        raise InvalidInput(inputs.located(str(e), what)) from None


def decode(
    message: pb.ModelInferRequest, spec: inputs.InputSpec, limits: RequestLimits
) -> oip.InferRequest:
    """A decoded request; InvalidInput names the first problem, as for HTTP."""
    if len(message.inputs) > MAX_TENSORS or len(message.outputs) > MAX_TENSORS:
        raise InvalidInput(f"a request names at most {MAX_TENSORS} inputs and outputs")
    tensors = []
    for i, tensor in enumerate(message.inputs):
        if len(tensor.shape) > MAX_DIMS:
            raise InvalidInput(f"inputs[{i}].shape: at most {MAX_DIMS} dimensions")
        given = _convert(parameters(tensor.parameters), oip.TensorParameters, "input.parameters")
        if given.binary_data_size is not None and not message.raw_input_contents:
            raise InvalidInput(  # KServe's client names the size of its raw bytes: checked below
                "input.parameters.binary_data_size without raw_input_contents: over gRPC the "
                "bytes are in raw_input_contents"
            )
        tensors.append(oip.TensorIn(tensor.name, list(tensor.shape), tensor.datatype, given))
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs: "
            "one per input, in order"
        )

    def values(tensor: oip.TensorIn, dtype: np.dtype, count: int) -> np.ndarray:
        tensor.parameters.refuse_shared_memory("input.parameters")
        contents = message.inputs[0].contents
        typed = getattr(contents, CONTENTS[tensor.datatype])
        if raw:
            if contents.ByteSize():
                raise InvalidInput("input: give raw_input_contents or contents, not both")
            data = raw[0]
            size = tensor.parameters.binary_data_size
            if size is not None and size != len(data):
                raise InvalidInput(
                    f"input.parameters.binary_data_size is {size}; raw_input_contents[0] has "
                    f"{len(data)} bytes"
                )
            if len(data) != count * dtype.itemsize:
                raise InvalidInput(
                    f"raw_input_contents[0] has {len(data)} bytes; shape {tensor.shape} of "
                    f"{tensor.datatype} takes {count * dtype.itemsize}"
                )
            return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))  # a copy
        if contents.ByteSize() and not len(typed):
            raise InvalidInput(
                f"input: a {tensor.datatype} tensor's contents are in {CONTENTS[tensor.datatype]}"
            )
        if len(typed) != count:
            raise InvalidInput(
                f"input.contents.{CONTENTS[tensor.datatype]} has {len(typed)} values; shape "
                f"{tensor.shape} takes {count} (or send raw_input_contents)"
            )
        return np.asarray(typed, dtype=dtype.newbyteorder("="))

    outputs = [
        oip.OutputIn(
            o.name, _convert(parameters(o.parameters), oip.OutputParameters, "output.parameters")
        )
        for o in message.outputs
    ]
    body = oip.InferBody(
        inputs=tensors,
        id=message.id or None,
        parameters=_convert(parameters(message.parameters), oip.RequestParameters, "parameters"),
        outputs=outputs or None,
    )
    return oip.checked_request(body, values, spec, limits, message.model_name)


def encode(
    model: str, request: oip.InferRequest, y: np.ndarray, answered: dict[str, Any]
) -> pb.ModelInferResponse:
    """(B, T, out) float32 outputs -> the response; `answered`: its parameters."""
    response = pb.ModelInferResponse(model_name=model, model_version=oip.VERSION)
    if request.id is not None:
        response.id = request.id
    for key, value in answered.items():
        response.parameters[key].int64_param = value  # sequence_position
    if request.output:
        response.outputs.add(name=oip.OUTPUT, datatype="FP32", shape=y.shape)
        response.raw_output_contents.append(
            np.ascontiguousarray(y, dtype=oip.DTYPES["FP32"]).tobytes()
        )
    return response


def sequence_of(message: pb.ModelInferRequest) -> Any:
    """The request's sequence id as sent (None: not part of a sequence), before any check."""
    if "sequence_id" not in message.parameters:
        return None
    return _value(message.parameters["sequence_id"]) or None
