"""Runtime: what one app instance owns (settings, metrics, models, sessions) and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.auth import ApiKeys
from service.engine.client import EngineClient, RemoteRegistry, RemoteSessions, RemoteStreams
from service.engine.messages import MetricsText
from service.engine.metrics import summed
from service.metrics import Metrics
from service.protocol import json_bounds
from service.protocol.errors import Draining, NotReady, ServiceError
from service.protocol.limits import InflightBudget, RequestLimits, StreamsPerKey
from service.sessions.manager import Clock
from service.settings import Settings
from service.store.base import StoreUnreachable

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Bodies at least this large are decoded off the event loop (msgspec parses ~1 MiB in ~5 ms).
OFFLOAD_DECODE_BYTES = 64 * 1024
EDGE_CONNECT_S = 10.0  # longest an edge's startup waits for the engine's first answer
METRICS_CACHE_S = 1.0  # an edge sums every process's page at most this often


class Runtime:
    """Built by create_app; `start` (in the lifespan) loads and warms the models in background.

    With `engine_socket`, this is an edge process of `tcnserve serve --workers N`: the models
    and sessions live in the engine process at that Unix socket, and `registry`, `sessions` and
    `streams` are its remote surfaces (service/engine/client.py); routes cannot tell.
    """

    def __init__(self, settings: Settings, clock: Clock, engine_socket: str | None = None):
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.limits = RequestLimits(
            settings.max_timesteps_per_request, settings.max_sequences_per_request
        )
        inflight = settings.max_inflight_body_bytes
        if engine_socket is not None:  # an edge holds its share (at least one largest body)
            inflight = max(settings.max_body_bytes, inflight // max(1, settings.resolved_workers()))
        self.inflight = InflightBudget(inflight)
        self.api_keys = ApiKeys(settings.api_key_values())
        self.engine: EngineClient | None = None
        self.registry: Any
        self.sessions: Any
        self.streams: Any
        if engine_socket is not None:
            self.engine = EngineClient(
                engine_socket, settings.retry_after_s, edge_metrics=self.metrics.render
            )
            self.registry = RemoteRegistry(self.engine, list(settings.models))
            self.engine.on_welcome = self.registry.update
            self.sessions = RemoteSessions(self.engine, self.registry, list(settings.models))
            self.streams = RemoteStreams(self.engine)
            self.durability = None
        else:  # the process that serves the models: the registry and torch load here only
            from service.models.registry import ModelRegistry
            from service.sessions.manager import SessionManager
            from service.store.durability import build_durability

            self.streams = StreamsPerKey(settings.streams_per_key_limit(), settings.retry_after_s)
            # Reads every checkpoint's config.json now: a bad model directory refuses to start.
            self.registry = ModelRegistry(settings, self.metrics)
            self.sessions = SessionManager(
                self.registry,
                self.metrics,
                clock,
                default_ttl_s=settings.session_ttl_s,
                max_ttl_s=settings.max_session_ttl_s,
                max_timesteps=settings.max_timesteps_per_request,
                expired_memory=settings.expired_memory,
                retry_after_s=settings.retry_after_s,
                max_sessions_per_key=settings.sessions_per_key_limit(),
            )
            self.durability = build_durability(settings, self.sessions, self.registry, self.metrics)
        self.draining = False
        self._load_error: str | None = None
        self.loaded = threading.Event()  # set once loading ends, either way (tests wait on it)
        self._tasks: list[asyncio.Task] = []
        self._metrics_page: tuple[float, bytes] | None = None  # an edge's summed page, cached
        # One thread: large bodies decode one at a time, which also bounds their transient
        # memory (about 10x the body while the rows are Python objects).
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="tcnserve-decode")

    @property
    def load_error(self) -> str | None:
        if self.engine is not None and self.engine.welcome is not None:
            return self.engine.welcome.load_error
        return self._load_error

    @load_error.setter
    def load_error(self, value: str | None) -> None:
        self._load_error = value

    @property
    def ready(self) -> bool:
        if self.engine is not None:
            welcome = self.engine.welcome
            if welcome is None or welcome.draining:
                return False
        return self.registry.ready and self.store_ready and not self.draining

    @property
    def ready_or_draining(self) -> bool:
        """Models loaded and the store connected: what `check_ready` asks."""
        return self.registry.ready and self.store_ready

    @property
    def store_ready(self) -> bool:
        return self.durability is None or self.durability.connected

    async def start(self) -> None:
        if self.engine is not None:  # an edge: the engine process loads the models
            self.engine.start()
            # Serving starts once the engine has answered (connections wait in the backlog
            # meanwhile), unless it is away: then requests are answered engine_unavailable.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.engine.ever_connected.wait(), EDGE_CONNECT_S)
            self._tasks.append(asyncio.create_task(self._connected(), name="tcnserve-connect"))
            return
        import torch

        torch.set_num_threads(self.settings.resolved_torch_threads())
        # float32 means float32: cuDNN's default TF32 convolutions would make a chunked push
        # differ from the step path and from /predict by ~1e-3 on Ampere and newer GPUs.
        torch.backends.cudnn.allow_tf32 = self.settings.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.settings.allow_tf32
        self._tasks.append(asyncio.create_task(self._load(), name="tcnserve-load"))
        self._tasks.append(
            asyncio.create_task(
                self.sessions.run_sweeper(self.settings.sweep_interval_s), name="tcnserve-sweeper"
            )
        )

    async def _connected(self) -> None:
        assert self.engine is not None
        await self.engine.ever_connected.wait()
        self.loaded.set()

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(json_bounds.warm)
            await self.registry.load()
            if self.durability is not None:
                await self.durability.start()
            self.metrics.models_ready.set(1)
        except StoreUnreachable as e:  # a deployment fault, said in one line: no traceback
            self.load_error = str(e)
        except Exception as e:
            logger.exception("loading the models failed")
            self.load_error = f"{type(e).__name__}: {e}"
        finally:
            self.loaded.set()

    def start_draining(self) -> None:
        """From now on /readyz is 503 and no new session is opened; existing ones still work."""
        if not self.draining:
            logger.info("draining: /readyz now answers 503")
        self.draining = True

    async def decode(self, size: int, fn: Callable[[], T]) -> T:
        """Run a body decoder: inline for small bodies, on the decode thread for large ones."""
        if size < OFFLOAD_DECODE_BYTES:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn)

    async def stop(self) -> None:
        self.start_draining()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.engine is not None:
            await self.engine.close()
        if self.durability is not None:
            try:  # in-flight requests have finished: every session goes to the store
                await self.durability.drain()
            except Exception:
                logger.exception("writing the sessions to the store failed")
            await self.durability.close()
        if self.engine is None:
            await self.registry.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def acquire_stream(self, owner: str) -> None:
        """Count an open WebSocket stream against its key (max_streams_per_key)."""
        if self.engine is not None:
            await self.streams.acquire(owner)
        else:
            self.streams.acquire(owner)

    async def release_stream(self, owner: str) -> None:
        await self.end_stream(owner, None)

    async def end_stream(self, owner: str, session: Any | None) -> None:
        """A stream's end: release its count and, given its `session`, close that session.
        Across the boundary both requests are sent before anything is awaited, so a handler
        cancelled as its client goes still ends both (in-process the close is shielded)."""
        if self.engine is None:
            self.streams.release(owner)
            if session is not None:
                with contextlib.suppress(ServiceError):  # retired meanwhile
                    await self.sessions.close(session)
            return
        sent = []
        with contextlib.suppress(ServiceError):  # the engine is away: it released both then
            sent.append(self.streams.start_release(owner))
            if session is not None:
                sent.append(self.sessions.start_close(session))
        for future in sent:
            with contextlib.suppress(ServiceError):
                await self.engine.answer(future)

    async def render_metrics(self) -> bytes:
        """The /metrics page: this process's series, or with an engine, every process's."""
        if self.engine is None or not self.engine.connected:
            return self.metrics.render()
        now = time.monotonic()
        if self._metrics_page is None or now - self._metrics_page[0] >= METRICS_CACHE_S:
            answer = await self.engine.call(MetricsText(0, self.metrics.render()))
            page = await asyncio.to_thread(summed, answer.pages)
            self._metrics_page = (now, page)
        return self._metrics_page[1]

    def check_ready(self) -> None:
        """Raise NotReady unless every model is loaded and warmed."""
        if self.engine is not None and not self.engine.fresh:
            raise self.engine.unavailable()
        if not self.registry.ready or not self.store_ready:
            why = (
                f"model loading failed: {self.load_error}"
                if self.load_error
                else "models are loading"
                if not self.registry.ready
                else "connecting to the session store"
            )
            raise NotReady(why, self.settings.retry_after_s)

    def check_accepting(self) -> None:
        """Raise unless new sessions may be opened here (ready and not draining). With a
        session store a draining replica still opens them: it writes them out when it exits."""
        self.check_ready()
        has_store = (
            self.durability is not None
            if self.engine is None
            else self.settings.session_store != "memory"
        )
        if self.draining and not has_store:
            raise Draining("this server is shutting down", self.settings.retry_after_s)
