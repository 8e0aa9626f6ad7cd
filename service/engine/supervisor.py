"""`tcnserve serve --workers N`: one engine process, N edge processes on one port, kept alive.

The supervisor reserves the port, starts the engine (which loads the models and owns every
session) and then the edges (each binds the port with SO_REUSEPORT, so the kernel spreads
connections over them, and talks to the engine over its Unix socket), handing each its settings
on stdin (they hold the API keys: never written to a file). It then watches them:

- an edge that dies is replaced (at once the first time, then with a growing pause; one that
  keeps dying at startup stops the server); its connections drop, and nothing it acknowledged
  is lost (acknowledged pushes are recorded by the engine before they are answered);
- an engine that dies is restarted; meanwhile every edge answers `503 engine_unavailable` with
  Retry-After (never a hang), and sessions come back from the session store when one is set
  (without one they died with it, as in any single process);
- an engine that cannot load its models stops the server (exit 1), as `tcnserve serve` does.

SIGTERM or SIGINT drains: the edges first (each answers /readyz 503 for drain_s, then finishes
its requests), then the engine, which writes its sessions to the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from service.engine.process import LOAD_FAILED, listening_socket
from service.settings import Settings

logger = logging.getLogger("tcnserve.supervisor")
POLL_S = 0.05
EDGE_STOP_S = 35.0  # past drain_s: uvicorn's graceful shutdown takes up to 30 s
ENGINE_STOP_S = 60.0  # writing every session to the store may take a while
RESTART_BACKOFF_S = 0.5  # before the second restart of a process; doubled each time, to 10 s
MAX_BACKOFF_S = 10.0
# A process that dies this many times in a row within RESTARTS_WINDOW_S of its start is broken.
MAX_QUICK_DEATHS = 5
RESTARTS_WINDOW_S = 30.0
# A ready engine whose event loop has not turned for this long is stuck (its edges have dropped
# it after ENGINE_SILENT_S, 10 s): it is killed, and restarted as if it had died.
ENGINE_STUCK_S = 15.0


class _Slot:
    """One process the supervisor keeps alive, and its recent deaths."""

    def __init__(self, kind: str):
        self.kind = kind
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.quick_deaths = 0
        self.due = 0.0  # when to start it again after a death

    def died(self, now: float) -> None:
        self.quick_deaths = self.quick_deaths + 1 if now - self.started < RESTARTS_WINDOW_S else 1
        pause = 0.0 if self.quick_deaths == 1 else RESTART_BACKOFF_S * 2 ** (self.quick_deaths - 2)
        self.due = now + min(MAX_BACKOFF_S, pause)
        self.process = None


class Supervisor:
    def __init__(self, settings: Settings, workers: int):
        self.settings = settings
        self.workers = workers
        self._stopping = False
        self._engine = _Slot("engine")
        self._edges = [_Slot("edge") for _ in range(workers)]

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            reserved = listening_socket(self.settings.host, self.settings.port, listen=False)
        except OSError as e:
            print(
                f"tcnserve serve: refusing to start: cannot bind {self.settings.host}:"
                f"{self.settings.port}: {e.strerror}",
                file=sys.stderr,
            )
            return 2
        port = reserved.getsockname()[1]
        data = {**self.settings.secrets_revealed(), "port": port, "workers": self.workers}
        self._settings = json.dumps(data).encode()
        directory = Path(tempfile.mkdtemp(prefix="tcnserve-"))  # 0700: the engine's socket
        self._socket = directory / "engine.sock"
        try:
            logger.info(
                "tcnserve on http://%s:%d: %d edge processes, one engine process",
                self.settings.host, port, self.workers,
            )  # fmt: skip
            return self._supervise()
        finally:
            self._stop_all()
            reserved.close()
            shutil.rmtree(directory, ignore_errors=True)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _spawn(self, slot: _Slot) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.engine.process", slot.kind, str(self._socket),
             str(os.getpid())],
            stdin=subprocess.PIPE,
            # Ctrl-C reaches the whole foreground group: a child still importing must not die
            # of it with a traceback. An ignored signal stays ignored across exec; the child
            # keeps it so (service/engine/process.py), and the supervisor stops it in order.
            preexec_fn=_ignore_ctrl_c,
        )  # fmt: skip
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(self._settings)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        slot.process, slot.started = process, time.monotonic()

    def _stuck(self, alive_file: Path) -> bool:
        try:
            age = time.time() - alive_file.stat().st_mtime
        except FileNotFoundError:
            return False  # not ready yet: loading has no deadline of ours
        return age > ENGINE_STUCK_S

    def _supervise(self) -> int:
        ready_file = self._socket.with_suffix(".ready")
        alive_file = self._socket.with_suffix(".alive")
        self._spawn(self._engine)
        for edge in self._edges:
            self._spawn(edge)
        while not self._stopping:
            time.sleep(POLL_S)
            now = time.monotonic()
            engine = self._engine
            if (
                engine.process is not None
                and engine.process.poll() is None
                and self._stuck(alive_file)
            ):
                logger.error(
                    "the engine's event loop has not turned for %g s; killing it", ENGINE_STUCK_S
                )
                engine.process.kill()
                engine.process.wait()
            if engine.process is not None and engine.process.poll() is not None:
                code = engine.process.returncode
                if code == LOAD_FAILED or not ready_file.exists():
                    logger.error("the engine could not start (exit %s); stopping", code)
                    return 1
                logger.error("the engine exited (status %s); restarting it", code)
                ready_file.unlink(missing_ok=True)
                alive_file.unlink(missing_ok=True)  # the next one beats once it is ready
                engine.died(now)
            for i, edge in enumerate(self._edges):
                if edge.process is not None and edge.process.poll() is not None:
                    logger.error("edge %d exited (status %s)", i, edge.process.returncode)
                    edge.died(now)
                    if edge.quick_deaths >= MAX_QUICK_DEATHS:
                        logger.error("edge %d keeps dying at startup; stopping", i)
                        return 1
            for slot in (engine, *self._edges):
                if slot.process is None and now >= slot.due and not self._stopping:
                    self._spawn(slot)
        return 0

    def _stop_all(self) -> None:
        """Edges first (they drain and finish their requests), then the engine."""
        edges = [e.process for e in self._edges if e.process is not None]
        _stop(edges, self.settings.drain_s + EDGE_STOP_S)
        if self._engine.process is not None:
            _stop([self._engine.process], ENGINE_STOP_S)


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop(processes: list[subprocess.Popen], timeout_s: float) -> None:
    for p in processes:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("process %d did not stop in %.0f s; killing it", p.pid, timeout_s)
            p.kill()
            p.wait()
