"""The served models: each one's checkpoint, metadata, device, StreamPool and worker thread."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import (
    MAX_POSITION,
    NonFiniteOutputError,
    StreamPool,
    TCNConfig,
    load_model,
    read_checkpoint_info,
)
from service.metrics import Metrics
from service.models.inference import forward_sequences
from service.models.inputs import InputSpec
from service.models.inputs import embedding as checked_embedding
from service.models.worker import ModelWorker
from service.protocol.errors import (
    InternalError,
    InvalidInput,
    ModelNotFound,
    NonFiniteOutput,
    ServiceError,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class ModelEntry:
    """One served model. Its net and pool are touched only by its worker thread."""

    name: str
    directory: Path
    config: TCNConfig
    metadata: dict[str, Any]
    evaluation: dict[str, Any] | None  # the checkpoint's metrics.json, when it has one
    device: torch.device
    dtype: torch.dtype
    capacity: int
    worker: ModelWorker
    metrics: Metrics
    net: Any = None
    state_bytes_per_stream: int = 0
    max_input_abs: float | None = None  # set at load, from the weights
    max_embedding_abs: float | None = None  # a conditioned model's bound on its embeddings
    ready: bool = False
    cuda_graphs: bool = False  # StreamPool's CUDA-graph step (settings.cuda_graphs)

    def __post_init__(self) -> None:
        self._inputs: InputSpec | None = None
        self._streamed = self.metrics.timesteps.labels(self.name, "stream")

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)

    @property
    def inputs(self) -> InputSpec:
        """What requests for this model must hold (decided at load, then kept)."""
        if self._inputs is not None:
            return self._inputs
        limit = self.max_input_abs
        if limit is None:
            limit = float(torch.finfo(self.dtype).max)
        c = self.config
        spec = InputSpec(c.in_channels, c.vocab_size, self.input_dtype, limit, c.embedding_width)
        if self.ready:
            self._inputs = spec
        return spec

    def info(self) -> dict[str, Any]:
        """The public description served by /v1/models."""
        c = self.config
        return {
            "name": self.name,
            "in_channels": c.in_channels,
            "out_channels": c.output_size,
            "channels": list(c.channels),
            "kernel_size": c.kernel_size,
            "dilations": list(c.dilations),
            "receptive_field": c.receptive_field,
            "vocab_size": c.vocab_size,
            "input": "token_ids" if c.vocab_size is not None else "floats",
            "activation": c.activation,
            "output_activation": c.output_activation,
            # a conditioned model's sessions and /predict sequences each take an embedding of
            # sum(embedding_dims) values (null: the model takes none)
            "embedding_dims": list(c.embedding_dims) if c.embedding_dims else None,
            "embedding_mode": c.embedding_mode if c.embedding_dims else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_sessions": self.capacity,
            "state_bytes_per_stream": self.state_bytes_per_stream,
            "max_input_abs": self.max_input_abs,
            "max_position": MAX_POSITION,
            "trained": bool(self.metadata.get("trained", False)),
            "task": self.metadata.get("task"),
            "description": self.metadata.get("description"),
            "metadata": self.metadata,
            "evaluation": self.evaluation,
            "ready": self.ready,
        }

    # ----- model calls, all on the worker thread ---------------------------------------------

    def _build_pool(self) -> StreamPool:
        """The net and its pool, on the worker thread (which owns the pool from then on)."""
        self.net = load_model(self.directory, device=self.device, dtype=self.dtype)
        pool = StreamPool(
            self.net,
            self.capacity,
            device=self.device,
            dtype=self.dtype,
            cuda_graphs=self.cuda_graphs,
        )
        self.state_bytes_per_stream = pool.state_bytes_per_stream
        self.max_input_abs = pool.max_input_abs
        self.max_embedding_abs = pool.max_embedding_abs
        return pool

    async def load(self) -> None:
        """Build the model and its pool, then warm both so the first request pays no set-up."""
        self.worker.start()
        await self.worker.install(self._build_pool)
        c = self.config
        length = min(c.receptive_field, 32)
        if c.vocab_size is not None:
            x = np.zeros(length, dtype=np.int64)
        else:
            x = np.zeros((length, c.in_channels), dtype=self.input_dtype)
        e = np.zeros((1, c.embedding_width)) if c.embedding_dims else None  # conditioned
        await self.worker.call(
            lambda: forward_sequences(self.net, [x], self.device, self.dtype, False, e),
            op="warmup",
        )
        await self.worker.warm(x)
        self.ready = True
        logger.info(
            "model %s ready on %s/%s: receptive field %d, %d slots of %.1f KiB",
            self.name,
            self.device,
            self.dtype,
            self.config.receptive_field,
            self.capacity,
            self.state_bytes_per_stream / 1024,
        )

    async def open_stream(self, position: int = 0, embedding: np.ndarray | None = None) -> int:
        """A fresh pool slot at `position` (PoolFullError when none is free), conditioned on
        `embedding` where the model takes one (ValueError names what is wrong with it)."""
        return await self.worker.open(position, embedding)

    async def stream_history(self, slot: int) -> np.ndarray:
        """The stream's last min(position, R - 1) inputs, oldest first: its snapshot."""
        return self._as_rows(await self.worker.history(slot))

    async def stream_histories(self, slots: list[int]) -> list[np.ndarray]:
        """`stream_history` of many streams in one worker call (snapshots for the store)."""
        return [self._as_rows(rows) for rows in await self.worker.histories(slots)]

    def _as_rows(self, history: torch.Tensor) -> np.ndarray:
        if history.dtype == torch.int64:  # token ids stay int64
            return history.numpy()
        return history.to(torch.float64 if self.dtype == torch.float64 else torch.float32).numpy()

    async def close_stream(self, slot: int) -> None:
        await self.worker.close(slot)

    async def reset_stream(self, slot: int) -> None:
        await self.worker.reset(slot)

    def submit(self, slot: int, x: np.ndarray, done: Callable[[Any, ServiceError | None], None]):
        """Feed T rows to a stream, batched with other streams' pushes by the worker; `done`
        gets the (T, out) float32 outputs, or the ServiceError refusing them, on this loop.

        Arrays, not Python lists, all the way to the edge (a replay cache of lists would cost
        ~25x the memory, and binary frames need no conversion). Raises WorkerStopped (a 503
        draining) once the worker has shut down.
        """
        counted = self._streamed

        def settled(outputs: Any, error: BaseException | None) -> None:
            if error is None:
                counted.inc(len(x))
                done(outputs, None)
            else:
                done(None, self._push_error(error))

        self.worker.submit(slot, x, settled)

    def submit_many(self, slots: list[int], xs: list[np.ndarray], done: ManyDone) -> None:
        """`submit` for many distinct streams, answered by one call once every one of them is:
        `done(outputs, errors)`, where outputs[k] is the k-th stream's (T, out) outputs, or
        None where errors[k] holds the error refusing its push alone (POST /v1/steps: one
        callback per request and model, not one per stream). Raises WorkerStopped, having
        submitted none of them."""
        if not slots:
            done([], {})
            return
        self.worker.submit_many(slots, xs, _Answers(len(slots), self, xs, done).one)

    def _push_error(self, error: BaseException) -> BaseException:
        """A push's failure on the worker, as its caller sees it."""
        if isinstance(error, ServiceError):  # WorkerStopped: 503 draining
            return error
        if isinstance(error, ValueError):  # the pool refused it and changed nothing
            return _refusal(error)
        if isinstance(error, Exception):  # e.g. out of memory: the pool changed nothing
            logger.error("a push to model %s failed", self.name, exc_info=error)
            return InternalError("internal server error")
        return error

    async def predict(
        self,
        sequences: list[np.ndarray],
        last_only: bool,
        embeddings: list[list[float]] | None = None,
    ) -> list[np.ndarray]:
        """Per sequence, its (T, out) float32 outputs (or its last row with last_only); a
        conditioned model's sequences each with its embedding (service/models/inputs.py)."""
        dims, vectors = self.config.embedding_dims, None
        if dims is None or embeddings is None:  # refused if given to a model taking none, or
            checked_embedding(embeddings, dims, "embeddings")  # missing for one that needs them
        else:
            if len(embeddings) != len(sequences):
                raise InvalidInput(
                    f"embeddings: give one per sequence ({len(sequences)}), got {len(embeddings)}"
                )
            vectors = np.stack(
                [checked_embedding(e, dims, f"embeddings[{i}]") for i, e in enumerate(embeddings)]
            )  # (B, E)
            limit = self.max_embedding_abs  # the bound a stream's embedding is held to at open
            if limit is not None and float(np.abs(vectors).max()) > limit:
                raise InvalidInput(
                    f"embeddings: a value beyond +-{limit:.3g}, the largest magnitude this "
                    "model takes without overflowing"
                )

        def forward() -> list[np.ndarray]:
            return forward_sequences(
                self.net, sequences, self.device, self.dtype, last_only, vectors
            )

        outputs = await self.worker.call(forward, op="forward")
        if not all(np.isfinite(y).all() for y in outputs):
            raise NonFiniteOutput(
                "the model's outputs for these inputs would be NaN or Inf (inputs this large "
                "overflow the model's dtype)"
            )
        self.metrics.timesteps.labels(self.name, "predict").inc(sum(len(s) for s in sequences))
        return outputs


# Called once with every stream's outputs (None where refused) and the refusals by index.
ManyDone = Callable[[list[Any], dict[int, BaseException]], None]


class _Answers:
    """Collects the per-stream answers of `ModelEntry.submit_many`, then calls its `done`."""

    __slots__ = ("done", "entry", "errors", "left", "outputs", "xs")

    def __init__(self, n: int, entry: ModelEntry, xs: list[np.ndarray], done: ManyDone):
        self.outputs: list[Any] = [None] * n
        self.errors: dict[int, BaseException] = {}
        self.left = n
        self.entry, self.xs, self.done = entry, xs, done

    def one(self, k: int, outputs: Any, error: BaseException | None) -> None:
        if error is None:
            self.outputs[k] = outputs
        else:
            self.errors[k] = self.entry._push_error(error)
        self.left -= 1
        if not self.left:
            refused = sum(len(self.xs[k]) for k in self.errors)
            self.entry._streamed.inc(sum(map(len, self.xs)) - refused)
            self.done(self.outputs, self.errors)


def _refusal(error: ValueError) -> ServiceError:
    """A pool's refusal (it changed nothing) as the error a client sees."""
    if isinstance(error, NonFiniteOutputError):
        return NonFiniteOutput(
            "the model's outputs for these inputs would be NaN or Inf; nothing was applied "
            "(inputs this large overflow the model's dtype)"
        )
    return InvalidInput(str(error))


class ModelRegistry:
    """Reads every checkpoint's config at construction; `load` builds and warms the models."""

    def __init__(self, settings: Settings, metrics: Metrics):
        device = torch.device(settings.resolved_device())
        dtype = TORCH_DTYPES[settings.dtype]
        self._entries: dict[str, ModelEntry] = {}
        for name, directory in settings.models.items():
            config, metadata = read_checkpoint_info(directory)
            if config.receptive_field - 1 > settings.max_timesteps_per_request:
                raise ValueError(
                    f"model {name!r}: a snapshot holds receptive_field - 1 = "
                    f"{config.receptive_field - 1} rows, more than max_timesteps_per_request "
                    f"({settings.max_timesteps_per_request}): sessions could not be restored"
                )
            self._entries[name] = ModelEntry(
                name=name,
                directory=Path(directory),
                config=config,
                metadata=metadata,
                evaluation=_read_evaluation(Path(directory)),
                device=device,
                dtype=dtype,
                capacity=settings.max_sessions,
                worker=ModelWorker(
                    name, metrics, settings.max_batch_size, settings.max_batch_delay_ms / 1000
                ),
                metrics=metrics,
                cuda_graphs=settings.cuda_graphs,
            )
            # Create the per-model series now, so they read 0 (not absent) before any traffic.
            metrics.step_batch_size.labels(name)
            metrics.active_sessions.labels(name)
            for counter in (
                metrics.sessions_created,
                metrics.sessions_expired,
                metrics.sessions_deleted,
            ):
                counter.labels(name)

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelNotFound(
                f"no model named {name!r}; served: {', '.join(self._entries)}"
            ) from None

    async def load(self) -> None:
        for entry in self._entries.values():
            await entry.load()

    async def close(self) -> None:
        for entry in self._entries.values():
            await entry.worker.stop()


def _read_evaluation(directory: Path) -> dict[str, Any] | None:
    path = directory / METRICS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable %s: %s", path, e)
        return None
    if not isinstance(data, dict):
        return {"value": data}
    # What a client wants to know of a model, not the whole run: drop the per-epoch history and
    # the training curve (they stay in metrics.json and learning_curve.png).
    return {k: v for k, v in data.items() if k not in ("history", "curve")}
