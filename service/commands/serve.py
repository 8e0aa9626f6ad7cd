"""`tcnserve serve`: N edge processes and an engine process (`--workers N`), or one process."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from service import log_redaction
from service.app import create_app
from service.engine.runtime import Runtime
from service.gc_tuning import tune_collector
from service.http.protocol import deadline_protocol
from service.settings import DTYPES, Settings, parse_model_specs
from service.ws.protocol import ReleasingWebSocketProtocol

# CLI flag -> Settings field; every one is also TCNSERVE_<FIELD> in the environment.
FLAGS: dict[str, tuple[type, str]] = {
    "host": (str, "address to bind (default 127.0.0.1)"),
    "port": (int, "port (default 8000)"),
    "grpc_port": (int, "port of the OIP gRPC service, e.g. 8001 (default: no gRPC)"),
    "max_sessions": (int, "stream slots per model (default 256)"),
    "session_ttl_s": (float, "idle seconds before a session expires (default 600)"),
    "max_batch_size": (int, "most streams per batched step (default: all, within 10 ms)"),
    "max_batch_delay_ms": (float, "longest a push waits for others to batch with (default 1)"),
    "max_timesteps_per_request": (int, "rows summed over a request (default 100000)"),
    "max_sequences_per_request": (int, "sequences in one /predict (default 1024)"),
    "max_body_bytes": (int, "largest request body (default 16 MiB)"),
    "max_sessions_per_key": (int, "sessions one API key may hold (default: see docs)"),
    "request_timeout_s": (float, "seconds a connection has to send a whole request (30)"),
    "max_connections": (int, "concurrent connections before 503 (default: 4 per slot)"),
    "drain_s": (float, "seconds /readyz answers 503 after SIGTERM before exiting (default 0)"),
    "torch_threads": (int, "intra-op threads for model compute (default (cores-1)//2, >= 1)"),
    "session_store": (str, "memory (default) or redis://host:port/db: sessions outlive a replica"),
    "replica_id": (str, "this replica's name in the session store (default: host-pid-random)"),
    "snapshot_interval_s": (float, "seconds between snapshots of changed sessions (default 5)"),
    "workers": (
        int,
        "edge processes before one engine (default: 1 per core, <= 8; 0: one process)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    for field, (kind, help_text) in FLAGS.items():
        parser.add_argument("--" + field.replace("_", "-"), type=kind, help=help_text)
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME=DIR",
        help="serve the checkpoint DIR as NAME (repeatable; DIR `builtin`: the built-in model; "
        "default: the built-in model as `default`)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    parser.add_argument("--dtype", choices=DTYPES, help="default float32")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    overrides = {f: getattr(args, f) for f in FLAGS if getattr(args, f, None) is not None}
    for field in ("device", "dtype", "log_level"):
        if getattr(args, field, None) is not None:
            overrides[field] = getattr(args, field)
    try:
        if args.model:
            overrides["models"] = parse_model_specs(args.model)
            for spec in args.model:
                if "=" not in spec:
                    print(
                        f"tcnserve serve: serving {spec} as model 'default' (give NAME=DIR to "
                        "name it)",
                        file=sys.stderr,
                    )
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as e:
        print(f"tcnserve serve: {_explain(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    busy = port_in_use(settings.host, settings.port)
    if not busy and settings.grpc_port is not None:
        busy = port_in_use(settings.host, settings.grpc_port, "--grpc-port")
    if busy:  # before the models load, not seconds later
        print(f"tcnserve serve: refusing to start: {busy}", file=sys.stderr)
        return 2
    workers = settings.resolved_workers()
    if workers:  # N edge processes and an engine process (service/engine/supervisor.py)
        from service.engine.supervisor import Supervisor

        return Supervisor(settings, workers).run()
    try:
        app = create_app(settings)
    except (ValueError, OSError) as e:
        print(f"tcnserve serve: refusing to start: {e}", file=sys.stderr)
        return 2
    return serve(app, settings, host=settings.host, port=settings.port)


def port_in_use(host: str, port: int, flag: str = "--port") -> str | None:
    """Why `host:port` cannot be served (another process listens there), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            return (
                f"cannot listen on {host}:{port} ({e.strerror}): is another server there? "
                f"pass another {flag}"
            )
    return None


def serve(
    app: Any, settings: Settings, sockets: list | None = None, share: int = 1, **where: Any
) -> int:
    """Run `app` under uvicorn until SIGTERM/SIGINT (after drain_s); the exit status."""
    runtime: Runtime = app.state.runtime
    config = uvicorn_config(app, settings, share, **where)
    log_redaction.install()  # after Config has set up logging: no API key in any log line
    server = DrainingServer(config, runtime, settings.drain_s)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully (SIGINT as
    # a KeyboardInterrupt traceback, SIGTERM as death by signal); these handlers take it, so
    # Ctrl-C and SIGTERM both end in a plain exit 0 after the drain.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _after_shutdown)
    try:
        server.run(sockets=sockets)
    finally:  # a process stuck on its way out must still die of the next signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
    if runtime.load_error:
        print(f"tcnserve serve: {runtime.load_error}", file=sys.stderr)
        return 1
    return 0


def uvicorn_config(app: Any, settings: Settings, share: int = 1, **where: Any) -> uvicorn.Config:
    """The uvicorn configuration of a server process (`where`: host and port, or nothing when
    it is handed its listening socket); `share`: the edge processes that split the server's
    connection limit (each takes its part, rounded up)."""
    return uvicorn.Config(
        app,
        **where,
        workers=1,  # more processes are `tcnserve serve --workers N` (service/engine/)
        lifespan="on",
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        http=deadline_protocol(settings.request_timeout_s, settings.max_header_bytes),  # 408, 431
        limit_concurrency=-(-settings.connection_limit() // share),  # 503 beyond it
        # uvicorn's sans-I/O websockets protocol, which stops reading a connection after each
        # message until the app has taken it, so at most one message of up to ws_max_size waits
        # per connection (a larger one closes the socket with 1009); messages being answered
        # are held against max_inflight_body_bytes (service/ws/stream.py).
        ws=ReleasingWebSocketProtocol,  # frees a dropped connection's last message at once
        ws_max_size=settings.max_body_bytes,
        ws_per_message_deflate=False,  # float32 frames barely compress; spare the CPU
    )


def _after_shutdown(sig: int, frame: FrameType | None) -> None:
    """A signal re-raised by uvicorn after its graceful shutdown: nothing left to do."""


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, answer /readyz 503 for drain_s, then shut down."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_s: float):
        super().__init__(config)
        self.runtime = runtime
        self.drain_s = drain_s
        self._exit_at: float | None = None
        self._gc_frozen = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_s <= 0 or self._exit_at is not None:
            self.runtime.start_draining()
            super().handle_exit(sig, frame)
            return
        self.runtime.start_draining()
        self._exit_at = time.monotonic() + self.drain_s

    async def on_tick(self, counter: int) -> bool:
        if not self._gc_frozen and self.runtime.loaded.is_set():
            tune_collector()
            self._gc_frozen = True
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        if self.runtime.load_error:  # a model that cannot load will not become ready
            self.should_exit = True
        return await super().on_tick(counter)


def _explain(error: Exception) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for err in error.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            message = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """`python -m service.commands.serve`: the same command without the CLI dispatcher."""
    parser = argparse.ArgumentParser(prog="tcnserve serve", description=__doc__)
    add_arguments(parser, "serve")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
