"""Service settings: pydantic-settings with the TCNSERVE_ prefix; unsafe values refuse to start."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

logger = logging.getLogger(__name__)

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_API_KEY_LENGTH = 16
DTYPES = ("float32", "float64", "bfloat16", "float16")


def default_model_dir() -> Path:
    """The small model shipped inside the package (service/default_model/)."""
    return Path(__file__).resolve().parent / "default_model"


class Settings(BaseSettings):
    """Everything `tcnserve serve` can be told, each also settable as TCNSERVE_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="TCNSERVE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # NAME=DIR pairs; env: TCNSERVE_MODELS='default=/models/a,fast=/models/b' or a JSON object.
    models: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=lambda: {"default": default_model_dir()}
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    max_sessions: int = Field(256, ge=1, description="stream slots per model (preallocated)")
    session_ttl_s: float = Field(600.0, gt=0, description="idle time before a session expires")
    max_session_ttl_s: float = Field(86_400.0, gt=0, description="largest ttl_s a client may ask")
    max_batch_size: int | None = Field(
        None,
        description="most streams advanced by one model call (unset: every open stream, unless "
        "a step of max_sessions streams takes over 10 ms here: measured at load)",
    )
    max_batch_delay_ms: float = Field(
        1.0, description="longest a push waits, from its submission, for others to batch with"
    )
    max_timesteps_per_request: int = Field(100_000, description="rows summed over a request")
    max_sequences_per_request: int = Field(1024, ge=1, description="sequences in one /predict")
    max_body_bytes: int = Field(16 * 1024 * 1024, description="largest request body")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, repr=False)
    api_keys_file: Path | None = Field(
        None, description="a file holding the API keys (a mounted Secret), read at start"
    )
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024, description="request bodies held at once, all requests together"
    )
    max_sessions_per_key: int | None = Field(
        None,
        ge=1,
        description="sessions one API key may hold across models (unset: all slots with one "
        "key; with several keys, 3/4 of max_sessions, so no key can lock the others out)",
    )
    max_streams_per_key: int | None = Field(
        None,
        ge=1,
        description="WebSocket streams one API key may hold open at once (unset: no cap with "
        "zero or one key; with several keys, 3/4 of max_connections)",
    )
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="port of the Open Inference Protocol's gRPC service (Triton's is 8001; "
        "unset: no gRPC), on host, beside HTTP (docs/grpc.md)",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="time a connection has to deliver a whole request (headers+body)"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="request line and headers of one request (431 above)"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="concurrent connections, WebSockets included; beyond it new requests get "
        "503 (unset: 4 per session slot, at least 1024)",
    )
    expired_memory: int = Field(10_000, ge=0, description="expired ids remembered for 410")
    sweep_interval_s: float = Field(5.0, gt=0, description="period of the expiry sweep")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 429 and 503")
    drain_s: float = Field(0.0, ge=0, description="seconds /readyz reports 503 before exit")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads for model compute (unset: (cores - 1) // 2, at least 1)",
    )
    allow_tf32: bool = Field(
        False, description="let CUDA float32 convs/matmuls use TF32 (faster, ~1e-3 error)"
    )
    cuda_graphs: bool = Field(
        False,
        description="run streaming steps as CUDA graphs, one per batch-size bucket "
        "(model/cuda_graphs.py; CUDA devices only; tested on CPU, not yet run on a GPU)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int | None = Field(
        None,
        ge=0,
        description="edge processes of `tcnserve serve`, all on one port, in front of one engine "
        "process that owns the models and sessions; 0: one process doing both (unset: one per "
        "core, at most 8)",
    )
    # Sessions that outlive this process (docs/durability.md).
    session_store: str = Field(
        "memory", description="memory (sessions die with the process) or redis://host:port/db"
    )
    replica_id: str | None = Field(
        None, description="this replica's name in the store (unset: hostname-pid-random)"
    )
    snapshot_interval_s: float = Field(
        5.0, gt=0, description="period of the store's snapshots of changed sessions"
    )
    store_timeout_s: float = Field(
        2.0,
        gt=0,
        description="most seconds one store operation may take before it counts as failed; "
        "snapshot_interval_s + store_timeout_s is the crash loss bound the server enforces",
    )
    handoff_timeout_s: float = Field(
        2.0, gt=0, description="wait for a live owner's handoff before taking a session over"
    )

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            return parse_model_specs([p for p in text.split(",") if p.strip()])
        if isinstance(value, (list, tuple)):
            return parse_model_specs(list(value))
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [k.strip() for k in text.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _read_api_keys_file(self) -> Settings:
        """Keys from `api_keys_file`: separated by commas or newlines; blank lines and lines
        starting with # are skipped. Read once, here; the file name is all that is kept."""
        if self.api_keys_file is None:
            return self
        if self.api_keys:
            raise ValueError("set api_keys or api_keys_file, not both")
        try:
            text = self.api_keys_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            problem = f"api_keys_file {self.api_keys_file} cannot be read: {reason}"
            raise ValueError(problem) from None
        lines = [x for x in text.splitlines() if not x.strip().startswith("#")]
        keys = [k.strip() for line in lines for k in line.split(",") if k.strip()]
        if not keys:
            raise ValueError(f"api_keys_file {self.api_keys_file} holds no key")
        self.api_keys = [SecretStr(k) for k in keys]
        return self

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        problems = []
        if not self.models:
            problems.append("models: serve at least one model (NAME=DIR)")
        for name, directory in self.models.items():
            if not MODEL_NAME_RE.match(name):
                problems.append(f"models: invalid model name {name!r} (use [A-Za-z0-9_.-])")
            checkpoint = Path(directory)
            try:
                found = (checkpoint / "config.json").is_file()
                # With --workers the engine process reads these after the fork, where a file
                # this user may not read (mode 0600, another owner) ends in its traceback.
                # (model/checkpoint.py's CONFIG_FILE and WEIGHTS_FILE: not imported, no torch.)
                unreadable = [
                    f
                    for f in ("config.json", "model.safetensors")
                    if (checkpoint / f).is_file() and not os.access(checkpoint / f, os.R_OK)
                ]
            except OSError as e:  # e.g. a directory this user may not enter (mode 0700)
                problems.append(
                    f"models: {name}={directory} cannot be read by this user ({e.strerror}): "
                    "make the checkpoint readable (a mounted model needs r-x on its directory)"
                )
                continue
            if unreadable:
                problems.append(
                    f"models: {name}={directory} cannot be read by this user (Permission "
                    f"denied: {', '.join(unreadable)}): make the checkpoint readable (a mounted "
                    "model needs r on its files)"
                )
                continue
            if not found:
                problems.append(f"models: {name}={directory} has no config.json checkpoint")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.cuda_graphs and not self.resolved_device().startswith("cuda"):
            problems.append("cuda_graphs needs a CUDA device (device=cuda)")
        if not 0 <= self.max_batch_delay_ms <= 1000:
            problems.append(
                f"max_batch_delay_ms must be in [0, 1000], got {self.max_batch_delay_ms}"
            )
        if self.max_timesteps_per_request < 1:
            problems.append("max_timesteps_per_request must be >= 1")
        if self.max_body_bytes < 1024:
            problems.append("max_body_bytes must be >= 1024")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            problems.append(
                f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes})"
            )
        if self.session_ttl_s > self.max_session_ttl_s:
            problems.append(
                f"session_ttl_s ({self.session_ttl_s}) exceeds max_session_ttl_s "
                f"({self.max_session_ttl_s})"
            )
        keys = [k.get_secret_value() for k in self.api_keys]
        if any(len(k) < MIN_API_KEY_LENGTH for k in keys):
            problems.append(f"api_keys must each be at least {MIN_API_KEY_LENGTH} characters")
        if len(set(keys)) != len(keys):
            problems.append("api_keys contains a duplicate key")
        if self.dtype == "float16" and self.resolved_device() != "cuda":
            problems.append("dtype float16 needs device cuda; on CPU use float32 or bfloat16")
        if self.device == "cuda" and not _cuda_available():
            problems.append("device is cuda but torch sees no CUDA GPU (use auto or cpu)")
        if self.session_store != "memory" and not self.session_store.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            problems.append(
                "session_store must be memory or a Redis URL (redis://host:port/db), got "
                f"{self.session_store.split('@')[-1]!r}"
            )
        if problems:
            raise ValueError("refusing to start: " + "; ".join(problems))
        if self.host not in ("127.0.0.1", "localhost", "::1") and not keys:
            logger.warning(
                "listening on %s with no API keys: anyone who can reach it can use it", self.host
            )
        return self

    def resolved_device(self) -> str:
        """auto -> cuda when a GPU is visible, else cpu."""
        if self.device == "auto":
            return "cuda" if _cuda_available() else "cpu"
        return self.device

    def resolved_torch_threads(self) -> int:
        """torch_threads in force. The event loop needs a core of its own: intra-op threads
        that compete with it (and with each other) for the GIL and the cores make a batched
        step several times slower on a small machine (measured 4.6x on 2 cores)."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (usable_cores() - 1) // 2)

    def resolved_workers(self) -> int:
        """workers in force: one edge per core, at most 8. An edge only uses a core while it
        has requests to answer, and on 2 cores 2 edges measured best for HTTP and /v1/steps
        (docs/scaling.md has the table)."""
        if self.workers is not None:
            return self.workers
        return min(8, usable_cores())

    def secrets_revealed(self) -> dict[str, Any]:
        """These settings as JSON-able values, secrets included: for the processes of one
        server, handed over in a file only its user may read (service/engine/supervisor.py)."""
        data = self.model_dump(mode="json")
        data["api_keys"] = self.api_key_values()
        data["api_keys_file"] = None  # read already: the keys are above
        return data

    def connection_limit(self) -> int:
        """max_connections in force: each session may hold a socket, and probes need room."""
        if self.max_connections is not None:
            return self.max_connections
        return max(1024, 4 * self.max_sessions * len(self.models))

    def sessions_per_key_limit(self) -> int | None:
        """The per-key session cap in force (None: no cap)."""
        if self.max_sessions_per_key is not None:
            return self.max_sessions_per_key
        if len(self.api_keys) >= 2:
            return max(1, self.max_sessions * 3 // 4)
        return None

    def streams_per_key_limit(self) -> int | None:
        """The per-key cap on open WebSocket streams in force (None: no cap)."""
        if self.max_streams_per_key is not None:
            return self.max_streams_per_key
        if len(self.api_keys) >= 2:
            return max(1, self.connection_limit() * 3 // 4)
        return None

    def api_key_values(self) -> list[str]:
        return [k.get_secret_value() for k in self.api_keys]


# A model DIR of exactly this names the built-in model (a directory called so: ./builtin).
BUILTIN = "builtin"


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """['NAME=DIR', ...] -> {NAME: DIR}; a bare DIR is served as `default`; DIR `builtin` is
    the built-in model (so `default=builtin mine=runs/x` serves both)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = str(spec).strip().partition("=")
        if not sep:
            name, directory = "default", name
        if name in out:
            raise ValueError(f"model name {name!r} given twice")
        directory = directory.strip()
        out[name.strip()] = str(default_model_dir()) if directory == BUILTIN else directory
    return out


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container limited to 2 CPUs on a 64-core node gets 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # rounded up
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cuda_available() -> bool:
    import torch  # deferred: settings parsing should not pay for torch unless it must

    return torch.cuda.is_available()
