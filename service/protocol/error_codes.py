"""Every error code a client may see: its HTTP status, and the WebSocket close code of those
that end a stream. One table, read by the server (service/http/errors.py), the Python client
(service/client/protocol.py) and the test that holds docs/service.md to it. Needs nothing.
"""

from __future__ import annotations

STATUS: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "model_not_found": 404,
    "session_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "session_exists": 409,
    "offset_conflict": 409,
    "session_expired": 410,
    "body_too_large": 413,
    "too_many_timesteps": 413,
    "too_many_sequences": 413,
    "headers_too_large": 431,
    "invalid_input": 422,
    "invalid_query": 422,
    "non_finite_output": 422,
    "capacity_exceeded": 429,
    "key_quota_exceeded": 429,
    "not_ready": 503,
    "draining": 503,
    "overloaded": 503,
    "durability_unavailable": 503,
    "engine_unavailable": 503,
    "internal": 500,
}

# The Open Inference Protocol (/v2, docs/oip.md) answers a request it cannot take with 400; the
# statuses that say more than that (auth, unknown model, conflicts, limits, busy) are kept.
OIP_STATUS: dict[str, int] = {
    **STATUS,
    "invalid_input": 400,
    "invalid_query": 400,
    "non_finite_output": 400,
    "session_not_found": 400,  # an unknown or ended sequence
    "session_expired": 400,  # an expired sequence (the message says which)
}

# gRPC (service/grpc/, docs/grpc.md): the status of each code, by grpc.StatusCode name. A
# ModelStreamInfer request's error is an error_message on the stream instead, which goes on.
GRPC_STATUS: dict[str, str] = {
    "bad_request": "INVALID_ARGUMENT",
    "unauthorized": "UNAUTHENTICATED",
    "model_not_found": "NOT_FOUND",
    "session_not_found": "NOT_FOUND",
    "not_found": "NOT_FOUND",
    "method_not_allowed": "UNIMPLEMENTED",
    "request_timeout": "DEADLINE_EXCEEDED",
    "session_exists": "ALREADY_EXISTS",
    "offset_conflict": "ABORTED",
    "session_expired": "NOT_FOUND",
    "body_too_large": "RESOURCE_EXHAUSTED",
    "too_many_timesteps": "RESOURCE_EXHAUSTED",
    "too_many_sequences": "RESOURCE_EXHAUSTED",
    "headers_too_large": "RESOURCE_EXHAUSTED",
    "invalid_input": "INVALID_ARGUMENT",
    "invalid_query": "INVALID_ARGUMENT",
    "non_finite_output": "INVALID_ARGUMENT",
    "capacity_exceeded": "RESOURCE_EXHAUSTED",
    "key_quota_exceeded": "RESOURCE_EXHAUSTED",
    "not_ready": "UNAVAILABLE",
    "draining": "UNAVAILABLE",
    "overloaded": "UNAVAILABLE",
    "durability_unavailable": "UNAVAILABLE",
    "engine_unavailable": "UNAVAILABLE",
    "internal": "INTERNAL",
}

# Errors that end a WebSocket stream close it with these codes (docs/streaming.md); any other
# error is answered as an error message and the socket stays open.
CLOSE: dict[str, int] = {
    "unauthorized": 4401,
    "session_not_found": 4404,
    "model_not_found": 4404,
    "session_expired": 4410,
    "capacity_exceeded": 4429,
    "key_quota_exceeded": 4429,
    "draining": 1001,
    "not_ready": 1013,
    "engine_unavailable": 1013,
    "invalid_query": 1008,
}
CLOSE_BAD_REQUEST = 4400  # a stream that cannot start: invalid parameters
CLOSE_INTERNAL_ERROR = 1011

# Worth retrying after Retry-After: the server is busy or starting, not refusing the request.
RETRYABLE = frozenset(
    {
        "capacity_exceeded",
        "key_quota_exceeded",
        "not_ready",
        "draining",
        "overloaded",
        "engine_unavailable",
    }
)
