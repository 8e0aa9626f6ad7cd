"""The two kinds of process `tcnserve serve --workers N` starts (service/engine/supervisor.py).

    python -m service.engine.process engine SOCKET SUPERVISOR_PID  < settings JSON
    python -m service.engine.process edge SOCKET SUPERVISOR_PID    < settings JSON

The settings (secrets included) arrive on stdin, never in a file; SOCKET is the engine's Unix
socket. An engine loads the models and answers edges there until SIGTERM, then, once its edges
have gone, writes its sessions to the store (when one is set) and exits. An edge waits for the
engine to be ready, binds the server's port with SO_REUSEPORT (the kernel spreads connections
over the edges; the port takes this edge's share only once uvicorn listens, after startup) and
serves the app with the engine's sessions. Both die with their supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from service import log_redaction
from service.settings import Settings

logger = logging.getLogger(__name__)
# An engine's exit status when its models cannot load: restarting it would fail again.
LOAD_FAILED = 3
LISTEN_BACKLOG = 2048
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# On SIGTERM an engine serves its edges until they have gone (the supervisor stops them first;
# a signal sent to the whole group reaches the engine at once), at most this long past drain_s.
ENGINE_WAITS_FOR_EDGES_S = 40.0
HEARTBEAT_S = 1.0  # how often a ready engine's event loop shows it turns


def engine_main(settings: Settings, path: str) -> int:
    from service.engine.runtime import Runtime
    from service.engine.server import EngineServer
    from service.gc_tuning import tune_collector

    async def main() -> int:
        runtime = Runtime(settings, time.time)
        server = EngineServer(runtime)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await runtime.start()  # loads in the background
        await server.listen(path)
        await asyncio.to_thread(runtime.loaded.wait)
        if runtime.load_error:
            logger.error("the engine cannot serve: %s", runtime.load_error)
            await server.close()
            await runtime.stop()
            return LOAD_FAILED
        tune_collector()
        server.broadcast()  # every edge connected meanwhile is ready at once
        Path(path).with_suffix(".ready").touch()  # the supervisor: this engine did start
        beating = asyncio.create_task(heartbeat(Path(path).with_suffix(".alive")))
        logger.info("engine ready at %s", path)
        await stop.wait()
        beating.cancel()
        await server.edges_gone(settings.drain_s + ENGINE_WAITS_FOR_EDGES_S)
        runtime.start_draining()
        await server.close()
        await runtime.stop()  # in-flight pushes finish; sessions go to the store
        return 0

    try:  # uvicorn's loop on the edges, and the faster one here (bench/engine_transport.py)
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


async def heartbeat(path: Path) -> None:
    """Touch `path` every HEARTBEAT_S from the event loop: a loop that stops turning (blocked,
    stopped) stops touching it, and the supervisor replaces the engine (supervisor.py)."""
    while True:
        path.touch()
        await asyncio.sleep(HEARTBEAT_S)


def edge_main(settings: Settings, path: str) -> int:
    from service.app import create_app
    from service.commands.serve import serve

    # The port takes this edge's connections only once the engine has loaded the models and
    # uvicorn listens (after the app's startup): until then other edges take them.
    ready = Path(path).with_suffix(".ready")
    while not ready.exists():
        time.sleep(0.05)
    sock = listening_socket(settings.host, settings.port, listen=False)  # uvicorn listens
    app = create_app(settings, engine_socket=path)
    # Server-wide limits are split over the edges: max_connections here (max_inflight_body_bytes
    # in the edge's Runtime), so N edges hold about what one process would.
    return serve(app, settings, sockets=[sock], share=settings.resolved_workers())


def listening_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    """A socket on (host, port) that other processes of this user may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(LISTEN_BACKLOG)
    return sock


def die_with_parent(supervisor: int) -> None:
    """SIGKILL this process when the supervisor dies, however it dies: the server is one unit,
    and a supervisor killed with SIGKILL must not leave edges serving its port (Linux). The
    supervisor may be PID 1 (a container's entrypoint), so its pid is handed over, not guessed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:  # it died before the prctl took hold
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    kind, socket_path, supervisor = (argv if argv is not None else sys.argv[1:])[:3]
    die_with_parent(int(supervisor))
    # SIGINT from a terminal goes to the supervisor, which stops its processes in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings(**json.loads(sys.stdin.read()))
    sys.stdin.close()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {kind} %(name)s: %(message)s",
    )
    log_redaction.install()
    if kind == "engine":
        return engine_main(settings, socket_path)
    if kind == "edge":
        return edge_main(settings, socket_path)
    raise SystemExit(f"unknown process kind {kind!r}")


if __name__ == "__main__":
    sys.exit(main())
