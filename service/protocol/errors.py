"""Domain errors raised by the core; http_errors.py is the one place that maps them to HTTP,
by their `code` through the table in error_codes.py."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client may see; `code` is stable and machine-readable."""

    code = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InternalError(ServiceError):
    """Something that should not happen happened (and was logged); the push changed nothing."""

    code = "internal"


class InvalidInput(ServiceError):
    code = "invalid_input"


class InvalidQuery(InvalidInput):
    """A WebSocket stream's query parameters are invalid (close 1008)."""

    code = "invalid_query"


class NonFiniteOutput(ServiceError):
    """The model's outputs for these inputs would be NaN or Inf; nothing was applied."""

    code = "non_finite_output"


class TooManyTimesteps(ServiceError):
    code = "too_many_timesteps"


class TooManySequences(TooManyTimesteps):
    code = "too_many_sequences"


class BodyTooLarge(ServiceError):
    code = "body_too_large"


class ModelNotFound(ServiceError):
    code = "model_not_found"


class SessionNotFound(ServiceError):
    code = "session_not_found"


class SessionExpired(ServiceError):
    code = "session_expired"


class SessionExists(ServiceError):
    code = "session_exists"


class OffsetConflict(ServiceError):
    """The push's offset is neither the session's position nor a replay of its last push."""

    code = "offset_conflict"

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = position


class CapacityExceeded(ServiceError):
    code = "capacity_exceeded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KeyQuotaExceeded(CapacityExceeded):
    """This API key holds max_sessions_per_key sessions; other keys are still served."""

    code = "key_quota_exceeded"


class Unauthorized(ServiceError):
    code = "unauthorized"


class NotReady(ServiceError):
    code = "not_ready"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Draining(NotReady):
    code = "draining"


class DurabilityUnavailable(NotReady):
    """The store has not taken this session's snapshots for longer than the durability bound:
    its pushes are refused (nothing applied) until it does."""

    code = "durability_unavailable"


class EngineUnavailable(NotReady):
    """The engine process is not reachable (restarting): nothing is known of the request's
    outcome past the moment it was sent, so a push is retried with its offset."""

    code = "engine_unavailable"


class Overloaded(NotReady):
    """Too many request bodies are buffered at once; the request was not read."""

    code = "overloaded"
