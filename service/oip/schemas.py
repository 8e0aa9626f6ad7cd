"""Bodies of the Open Inference Protocol routes (/v2) as documented at /docs.

Requests are decoded by service/oip/decode.py (msgspec, straight into arrays); these models are
their
documented form only.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class OipErrorBody(BaseModel):
    error: str = Field(description="what was wrong; nothing was changed")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="FP32, or INT64 for a token model's input")
    shape: list[int] = Field(description="-1: any size (batch, time)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


EXAMPLE_INPUT = {"name": "input", "shape": [1, 2, 2], "datatype": "FP32", "data": [0.5, 1, 0.25, 0]}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    EXAMPLE: ClassVar[dict[str, Any] | None] = None  # what /docs fills in (service/http/body.py)


class InputTensor(_Request):
    name: str = Field(description="always `input`")
    shape: list[int] = Field(description="[batch, time, in_channels]; token models [batch, time]")
    datatype: str = Field(description="FP32; token models INT64")
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the tensor's bytes follow the JSON header"
    )
    data: list[Any] | None = Field(
        None, description="the values, flat in row-major order or nested as the shape"
    )


class RequestedOutput(_Request):
    name: str = Field(description="always `output`")
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true or false")


class InferRequestDoc(_Request):
    EXAMPLE = {"id": "r-1", "inputs": [EXAMPLE_INPUT]}

    id: str | None = Field(None, description="echoed in the response")
    model_name: str | None = Field(None, description="if given, the path's model (KServe SDK)")
    model_version: str | None = Field(None, description="if given, the model's version, 1")
    parameters: dict[str, Any] | None = Field(
        None,
        description="sequence_id (integer or string), sequence_start, sequence_end, "
        "sequence_offset (tcnserve: position of the first row, for safe retries), "
        "binary_data_output",
        examples=[{"sequence_id": 42, "sequence_start": True}],
    )
    inputs: list[InputTensor] = Field(examples=[[EXAMPLE_INPUT]])
    outputs: list[RequestedOutput] | None = Field(None, description="absent: every output")


class OutputTensor(BaseModel):
    name: str
    shape: list[int] = Field(description="[batch, time, out_channels]")
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size when the values follow the JSON header"
    )
    data: list[float] | None = Field(None, description="flat, row-major")


class InferResponseDoc(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="sequence_position: the sequence's position after this request"
    )
    outputs: list[OutputTensor]
