"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on `grpc_port`.

An edge beside HTTP in the same process and event loop (grpc.aio), on the same Runtime: the same
sessions, batching, limits, per-key quotas and metrics. Requests decode through the same checks
as /v2 over HTTP (service/grpc/codec.py) and run through the same OipInference, so a sequence
streamed here is an ordinary session. With `tcnserve serve --workers N` every edge process
serves the port (gRPC binds it with SO_REUSEPORT), as it serves the HTTP one.

ModelStreamInfer answers each request as it completes: requests of one sequence in their
order, those of different sequences side by side (each in a task, at most STREAM_INFLIGHT per
call, then the call stops reading, and HTTP/2 flow control holds the client back). A request's
error is an `error_message` on the stream, which goes on; a refused key ends the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.engine.runtime import Runtime
from service.grpc import codec
from service.grpc import oip_pb2 as pb
from service.oip import decode as oip
from service.oip import stats
from service.oip.inference import OipInference
from service.protocol import error_codes
from service.protocol.errors import ServiceError

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
STREAM_INFLIGHT = 64  # requests of one ModelStreamInfer call being answered at once
STOP_GRACE_S = 5.0  # at shutdown, calls in progress have this long to finish
# The unary RPCs served: name -> (GrpcEdge method, request message); and ModelStreamInfer.
UNARY = {
    "ServerLive": ("server_live", pb.ServerLiveRequest),
    "ServerReady": ("server_ready", pb.ServerReadyRequest),
    "ModelReady": ("model_ready", pb.ModelReadyRequest),
    "ServerMetadata": ("server_metadata", pb.ServerMetadataRequest),
    "ModelMetadata": ("model_metadata", pb.ModelMetadataRequest),
    "ModelConfig": ("model_config", pb.ModelConfigRequest),
    "ModelStatistics": ("model_statistics", pb.ModelStatisticsRequest),
    "RepositoryIndex": ("repository_index", pb.RepositoryIndexRequest),
    "ModelInfer": ("model_infer", pb.ModelInferRequest),
}
STREAMING = "ModelStreamInfer"
KEEPALIVE_MS = 20_000  # pings on idle connections find dead peers (and their streams)


class GrpcEdge:
    """The gRPC server of one process; start() binds, stop() drains."""

    def __init__(self, runtime: Runtime, runner: OipInference):
        self.runtime = runtime
        self.runner = runner
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        settings = self.runtime.settings
        options = [
            ("grpc.so_reuseport", 1),  # every edge process on one port
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_metadata_size", settings.max_header_bytes),
        ]
        self.server = grpc.aio.server(
            options=options, maximum_concurrent_rpcs=settings.connection_limit()
        )
        self.server.add_generic_rpc_handlers((self._handlers(),))
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        await self.server.start()
        logger.info("gRPC (%s) on %s:%d", SERVICE, settings.host, self.port)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)

    def _handlers(self) -> grpc.GenericRpcHandler:
        unary = {name: (getattr(self, method), kind) for name, (method, kind) in UNARY.items()}
        counted = self.runtime.metrics.grpc_requests
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                _answering_errors(fn, name, counted),
                request_deserializer=kind.FromString,
                response_serializer=_serialize,
            )
            for name, (fn, kind) in unary.items()
        }
        handlers[STREAMING] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=_serialize,
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # ----- who asks ------------------------------------------------------------------------------

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        """The API key's owner, from `authorization: Bearer <key>` or `x-api-key` metadata."""
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return self.runtime.api_keys.owner(metadata.get("authorization"), metadata.get("x-api-key"))

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        owner = self._owner(context)
        self.runtime.check_ready()
        return owner

    def _entry(self, name: str, version: str) -> Any:
        return oip.model_entry(self.runtime.registry, name, version)

    # ----- health and metadata -----------------------------------------------------------------

    async def server_live(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # no key, as /v2/health/live

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        self._owner(context)
        entry = self._entry(request.name, request.version)
        return pb.ModelReadyResponse(ready=entry.ready and not self.runtime.draining)

    async def server_metadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        self._owner(context)
        return pb.ServerMetadataResponse(
            name="tcnserve", version="0.1.0", extensions=list(oip.EXTENSIONS)
        )

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        self._caller(context)
        entry = self._entry(request.name, request.version)
        meta = oip.model_metadata(request.name, entry.inputs, entry.config.output_size)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def model_config(self, request: pb.ModelConfigRequest, context: Any) -> Any:
        self._caller(context)
        entry = self._entry(request.name, request.version)
        settings = self.runtime.settings
        config = oip.model_config(
            request.name, entry.inputs, entry.config.output_size,
            settings.max_sequences_per_request, settings.session_ttl_s,
        )  # fmt: skip
        return _parsed(config, pb.ModelConfig, pb.ModelConfigResponse, "config")

    async def model_statistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Any:
        self._caller(context)
        if request.name:
            names = [self._entry(request.name, request.version).name]
        else:
            names = [entry.name for entry in self.runtime.registry.entries()]
        page = await self.runtime.render_metrics()
        answer = await asyncio.to_thread(stats.model_stats, page, names, oip.VERSION)
        return _parsed(answer, pb.ModelStatisticsResponse)

    async def repository_index(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:
        self._caller(context)
        index = oip.repository_index(self.runtime.registry, self.runtime.draining)
        models = [m for m in index if m["state"] == "READY" or not request.ready]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models]
        )

    # ----- inference ---------------------------------------------------------------------------

    async def model_infer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        return await self._infer(self._caller(context), request)

    async def _infer(self, owner: str, message: pb.ModelInferRequest) -> pb.ModelInferResponse:
        entry = self._entry(message.model_name, message.model_version)
        runtime = self.runtime
        decoded = await runtime.decode(
            message.ByteSize(), lambda: codec.decode(message, entry.inputs, runtime.limits)
        )
        y, answered = await self.runner.infer(owner, entry, decoded)
        return codec.encode(message.model_name, decoded, y, answered)

    async def model_stream_infer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            owner = self._caller(context)
        except ServiceError as e:
            await _abort(context, e)
            return
        room = asyncio.Semaphore(STREAM_INFLIGHT)
        writing = asyncio.Lock()  # one write at a time on the call, from whichever task answers
        latest: dict[tuple[str, Any], asyncio.Task] = {}  # a sequence's last request
        tasks: set[asyncio.Task] = set()
        counted = self.runtime.metrics.grpc_requests
        ok = counted.labels(STREAMING, "OK")

        async def answer(message: pb.ModelInferRequest, before: asyncio.Task | None) -> None:
            try:
                if before is not None and not before.done():  # a sequence's requests in order
                    await asyncio.wait([before])
                item = pb.ModelStreamInferResponse(infer_response=await self._infer(owner, message))
                ok.inc()
            except ServiceError as e:
                item = _stream_error(message, e.message)
                counted.labels(STREAMING, _status(e).name).inc()
            except Exception:
                logger.exception("ModelStreamInfer: a request failed")
                item = _stream_error(message, "internal error")
                counted.labels(STREAMING, "INTERNAL").inc()
            finally:
                room.release()
            async with writing:
                await context.write(item)

        try:
            async for message in requests:
                await room.acquire()
                key = (message.model_name, codec.sequence_of(message))
                task = asyncio.create_task(answer(message, latest.get(key)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if key[1] is not None:
                    latest[key] = task
                    task.add_done_callback(lambda t, k=key: _forget(latest, k, t))
            while tasks:  # the client is done sending: answer what it sent, then end the call
                await asyncio.wait(set(tasks))
        finally:
            for task in list(tasks):  # the call ended first (the client left, or a deadline)
                task.cancel()


def _forget(latest: dict, key: Any, task: asyncio.Task) -> None:
    if latest.get(key) is task:
        del latest[key]


def _stream_error(message: pb.ModelInferRequest, text: str) -> pb.ModelStreamInferResponse:
    """A request's error on the stream, naming the request (its id) it answers."""
    response = pb.ModelInferResponse(model_name=message.model_name, id=message.id)
    return pb.ModelStreamInferResponse(error_message=text, infer_response=response)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _parsed(value: dict, kind: type, wrapper: type | None = None, field: str = "") -> Any:
    """A JSON-shaped answer of the /v2 code -> its message (every field must exist here)."""
    from google.protobuf import json_format

    message = json_format.ParseDict(value, kind())
    return wrapper(**{field: message}) if wrapper is not None else message


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """The one mapping of domain errors to gRPC statuses (error_codes.GRPC_STATUS)."""
    status = _status(error)
    retry_after = getattr(error, "retry_after_s", None)  # busy, not refused: as Retry-After
    trailers = () if retry_after is None else (("retry-after", str(retry_after)),)
    await context.abort(status, error.message, trailers)


def _status(error: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error_codes.GRPC_STATUS.get(error.code, "INTERNAL"))


def _answering_errors(
    fn: Callable[..., Awaitable[Any]], method: str, counted: Any
) -> Callable[..., Awaitable[Any]]:
    """A unary handler whose domain errors become statuses, every call counted by `method`."""
    ok = counted.labels(method, "OK")

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            answer = await fn(request, context)
        except ServiceError as e:
            counted.labels(method, _status(e).name).inc()
            await _abort(context, e)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("gRPC %s failed", method)
            counted.labels(method, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        ok.inc()
        return answer

    return handler
