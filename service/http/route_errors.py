"""Which errors each HTTP route can answer: its OpenAPI `responses`, built from error classes.

Every /v1 and /v2 route but the health probes authenticates (401 when keys are on) and needs the
models loaded (503; with `--workers N`, the engine process reachable too); a route that reads a
body can also refuse it (413, or 503 when too many bodies are held at once) or find it invalid.
"""

from __future__ import annotations

from service.http.errors import error_responses
from service.protocol.errors import (
    BodyTooLarge,
    CapacityExceeded,
    Draining,
    EngineUnavailable,
    InvalidInput,
    KeyQuotaExceeded,
    ModelNotFound,
    NonFiniteOutput,
    NotReady,
    OffsetConflict,
    Overloaded,
    SessionExists,
    SessionExpired,
    SessionNotFound,
    TooManySequences,
    TooManyTimesteps,
    Unauthorized,
)

CALLER = (Unauthorized, NotReady, EngineUnavailable)  # the last with `--workers N`
BODY = (BodyTooLarge, Overloaded, InvalidInput)
SESSION = (SessionNotFound, SessionExpired)
COMPUTE = (TooManyTimesteps, NonFiniteOutput)

LIST_MODELS = error_responses(*CALLER)
GET_MODEL = error_responses(*CALLER, ModelNotFound)
PREDICT = error_responses(*CALLER, *BODY, *COMPUTE, ModelNotFound, TooManySequences)
CREATE_SESSION = error_responses(
    *CALLER, *BODY, *COMPUTE, Draining, ModelNotFound, SessionExists, CapacityExceeded,
    KeyQuotaExceeded,
)  # fmt: skip
PUSH = error_responses(*CALLER, *BODY, *COMPUTE, *SESSION, OffsetConflict)
SESSION_OPERATION = error_responses(*CALLER, *SESSION)  # describe, snapshot, reset, delete
LIST_SESSIONS = error_responses(*CALLER, InvalidInput)  # list, delete all
PUSH_MANY = error_responses(*CALLER, *BODY, TooManySequences)  # an item's error is in its result

V2_METADATA = error_responses(*CALLER, ModelNotFound, oip=True)
V2_INDEX = error_responses(*CALLER, oip=True)  # the model list and repository index
V2_MODEL_READY = error_responses(Unauthorized, ModelNotFound, oip=True)  # not ready: 400
V2_INFER = error_responses(
    *CALLER, *BODY, *COMPUTE, *SESSION, Draining, ModelNotFound, TooManySequences,
    OffsetConflict, CapacityExceeded, KeyQuotaExceeded, oip=True,
)  # fmt: skip
