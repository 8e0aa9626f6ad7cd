"""`tcnserve serve --workers N`: one engine process, N edge processes on one port, kept alive.

The supervisor reserves the port, writes the settings where only its user can read them, starts
the engine (which loads the models and owns every session) and then the edges (each binds the
port with SO_REUSEPORT, so the kernel spreads connections over them, and talks to the engine
over its Unix socket). It then watches them:

- an edge that dies is replaced at once; its connections drop, and nothing it acknowledged is
  lost (acknowledged pushes are recorded by the engine before they are answered);
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
RESTART_BACKOFF_S = 0.5


class Supervisor:
    def __init__(self, settings: Settings, workers: int):
        self.settings = settings
        self.workers = workers
        self._stopping = False
        self._engine: subprocess.Popen | None = None
        self._edges: list[subprocess.Popen | None] = [None] * workers

    def run(self) -> int:
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
        directory = Path(tempfile.mkdtemp(prefix="tcnserve-"))  # 0700
        try:
            self._settings_file = directory / "settings.json"
            data = {**self.settings.secrets_revealed(), "port": port, "workers": self.workers}
            fd = os.open(self._settings_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            self._socket = directory / "engine.sock"
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)
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

    def _spawn(self, kind: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "service.engine.process", kind,
             str(self._settings_file), str(self._socket)],
        )  # fmt: skip

    def _supervise(self) -> int:
        ready_file = self._socket.with_suffix(".ready")
        self._engine = self._spawn("engine")
        for i in range(self.workers):
            self._edges[i] = self._spawn("edge")
        while not self._stopping:
            time.sleep(POLL_S)
            code = self._engine.poll()
            if code is not None and not self._stopping:
                if code == LOAD_FAILED or not ready_file.exists():
                    logger.error("the engine could not start (exit %s); stopping", code)
                    return 1
                logger.error("the engine exited (status %s); restarting it", code)
                time.sleep(RESTART_BACKOFF_S)
                ready_file.unlink(missing_ok=True)
                self._engine = self._spawn("engine")
            for i, edge in enumerate(self._edges):
                if edge is not None and edge.poll() is not None and not self._stopping:
                    logger.error("edge %d exited (status %s); replacing it", i, edge.returncode)
                    self._edges[i] = self._spawn("edge")
        return 0

    def _stop_all(self) -> None:
        """Edges first (they drain and finish their requests), then the engine."""
        edges = [e for e in self._edges if e is not None]
        _stop(edges, self.settings.drain_s + EDGE_STOP_S)
        if self._engine is not None:
            _stop([self._engine], ENGINE_STOP_S)


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
