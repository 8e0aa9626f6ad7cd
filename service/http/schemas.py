"""Request and response bodies of the HTTP API as they are documented at /docs.

Requests are decoded by service/models/inputs.py (msgspec, straight into arrays); these models are
their documented form, kept field for field equal to it (tests/service/test_openapi.py).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model import MAX_POSITION
from service.protocol.limits import SESSION_ID_PATTERN

# Strict: a number, never a string or a bool; finite: Python's json accepts NaN and Infinity.
Value = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Row = Annotated[list[Value], Field(min_length=1, description="one timestep: in_channels numbers")]
Rows = list[Row]
OutputRow = Annotated[
    list[float], Field(description="one timestep's outputs: out_channels numbers")
]
OutputRows = list[OutputRow]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The body /docs fills in for "Try it out": one the built-in model accepts as it is
    # (tests/service/test_openapi_examples.py sends each one).
    EXAMPLE: ClassVar[dict[str, Any] | None] = None


class PredictRequest(_Request):
    EXAMPLE = {"inputs": [[[0.5, 1.0], [0.1, 0.0], [0.9, 1.0]]], "outputs": "all"}

    inputs: list[Annotated[Rows, Field(min_length=1)]] = Field(
        min_length=1,
        description="sequences (lengths may differ), each a list of T rows",
        examples=[[[[0.5, 1.0], [0.1, 0.0], [0.9, 1.0]]]],
    )
    outputs: Literal["all", "last"] = Field(
        "all", description="'all': one output row per input row; 'last': only the last row"
    )
    embeddings: list[list[float]] | None = Field(
        None,
        description="one embedding per sequence, sum(embedding_dims) values each: required by "
        "a conditioned model (GET /v1/models/{name}: embedding_dims), refused by others",
    )


class PredictResponse(BaseModel):
    model: str
    outputs: list[OutputRows] = Field(description="per sequence, its output rows")


class SnapshotIn(_Request):
    position: int = Field(
        ge=0, le=MAX_POSITION, strict=True, description="the position to continue from"
    )
    inputs: Rows = Field(description="exactly the last min(position, receptive_field - 1) rows")
    # Present when a GET .../snapshot body is posted back as it is; the new session's own id
    # and model come from the request, and a snapshot of another model is refused.
    session_id: str | None = None
    model: str | None = None
    embedding: list[float] | None = Field(
        None, description="the session's embedding (a conditioned model's), as GET gave it"
    )


class Snapshot(BaseModel):
    session_id: str
    model: str
    position: int
    inputs: Rows = Field(description="the last min(position, receptive_field - 1) input rows")
    embedding: list[float] | None = Field(
        None, description="a conditioned model's session's embedding (absent for other models)"
    )


class CreateSessionRequest(_Request):
    EXAMPLE = {"model": "default", "session_id": "sensor-0042", "prefix": [[0.5, 0.0], [0.8, 1.0]]}

    model: str = "default"
    session_id: str | None = Field(
        None, pattern=SESSION_ID_PATTERN, description="client-chosen id (else generated)"
    )
    ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="idle timeout")
    prefix: Rows | None = Field(None, description="history rows that warm the state")
    snapshot: SnapshotIn | None = Field(
        None, description="rebuild a session at a position from its last inputs (not with prefix)"
    )
    embedding: list[float] | None = Field(
        None,
        description="what the session is conditioned on, sum(embedding_dims) values: required "
        "by a conditioned model (GET /v1/models/{name}: embedding_dims), refused by others",
    )

    @model_validator(mode="after")
    def _prefix_or_snapshot(self) -> CreateSessionRequest:
        if self.prefix is not None and self.snapshot is not None:
            raise ValueError("give either prefix or snapshot, not both")
        return self


class SessionCreated(BaseModel):
    session_id: str
    model: str
    position: int
    expires_at: float = Field(description="Unix time, seconds")
    outputs: OutputRows | None = Field(None, description="outputs of the prefix rows, if any")


class StepRequest(_Request):
    EXAMPLE = {"inputs": [[0.1, 0.0]]}  # at the session's position (add "offset" for retries)

    inputs: Annotated[Rows, Field(min_length=1)] = Field(examples=[[[0.5, 1.0]]])
    offset: int | None = Field(
        None,
        ge=0,
        le=MAX_POSITION,
        strict=True,
        description="position of the first row (for safe retries)",
    )


class StepResponse(BaseModel):
    outputs: OutputRows
    position: int


class ManyStepsItem(_Request):
    session_id: str
    inputs: Annotated[Rows, Field(min_length=1)]
    offset: int | None = Field(
        None, ge=0, le=MAX_POSITION, strict=True, description="as in /v1/sessions/{id}/steps"
    )


class ManyStepsRequest(_Request):
    EXAMPLE = {"steps": [{"session_id": "sensor-0042", "inputs": [[0.5, 1.0]]}]}

    steps: list[ManyStepsItem] = Field(
        min_length=1,
        description="pushes to distinct sessions (any models, any row counts); a session named "
        "twice is an error for its later items",
        examples=[[{"session_id": "sensor-0042", "inputs": [[0.5, 1.0]]}]],
    )


class ManyStepsResult(BaseModel):
    session_id: str
    outputs: OutputRows | None = None
    position: int | None = None
    error: ErrorDetail | None = Field(None, description="instead of outputs: why it failed")


class ManyStepsResponse(BaseModel):
    results: list[ManyStepsResult] = Field(description="one per item, in request order")


class SessionInfo(BaseModel):
    session_id: str
    model: str
    position: int
    created_at: float
    last_used_at: float
    expires_at: float
    ttl_s: float


class ListedSession(SessionInfo):
    idle_s: float = Field(description="seconds since its last operation")


class SessionList(BaseModel):
    sessions: list[ListedSession]
    next: str | None = Field(
        description="pass as `after` to get the next page; null: this is the last page"
    )


class SessionsDeleted(BaseModel):
    deleted: int


class ModelInfo(BaseModel):
    name: str
    in_channels: int
    out_channels: int
    channels: list[int]
    kernel_size: int
    dilations: list[int]
    receptive_field: int = Field(description="R: an output depends on the last R inputs")
    vocab_size: int | None = Field(None, description="token models: ids are in [0, vocab_size)")
    input: Literal["floats", "token_ids"] = Field(
        description="rows of in_channels floats, or one integer token id per row"
    )
    activation: str = Field(description="every block's activation (relu in the paper)")
    output_activation: str
    embedding_dims: list[int] | None = Field(
        None,
        description="a conditioned model's embedding widths (pytorch-tcn's embedding_shapes): "
        "each session and /predict sequence takes an embedding of their sum; null: none",
    )
    embedding_mode: Literal["add", "concat"] | None = Field(
        None, description="how each block takes the embedding (null: no embedding)"
    )
    device: str
    dtype: str
    max_sessions: int = Field(description="stream slots (preallocated)")
    state_bytes_per_stream: int = Field(description="ring-buffer bytes one session holds")
    max_input_abs: float | None = Field(
        description="largest |input| taken (beyond it the model could overflow); null: no "
        "bound, outputs are checked instead"
    )
    max_position: int = Field(description="the largest position a session may reach")
    trained: bool
    task: str | None = None
    description: str | None = None
    metadata: dict[str, Any] = Field(description="the checkpoint's free-form metadata")
    evaluation: dict[str, Any] | None = Field(
        None,
        description="the checkpoint's metrics.json (measured value, paper's value, steps, "
        "command), without its per-epoch history and curve",
    )
    ready: bool = Field(description="loaded and warmed")


class ModelList(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str
    position: int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
