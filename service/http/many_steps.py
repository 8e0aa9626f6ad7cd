"""Pushes to many sessions at once, whatever carried them: POST /v1/steps and WS /v1/streams.

The edge decodes each item for its session's model, the session manager pushes them together
(so each model advances them in one batched call), and each item ends as its outputs and
position or as its own error: one bad item never fails the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.engine.runtime import Runtime
from service.models import inputs
from service.protocol.errors import InvalidInput, ServiceError, TooManySequences
from service.sessions.state import SessionHandle

NO_OUTPUTS = np.zeros((0, 0), dtype=np.float32)


@dataclass(frozen=True)
class Item:
    """One push as it arrived: rows not yet checked against the session's model."""

    session_id: str
    decode: Callable[[inputs.InputSpec], np.ndarray]  # rows for the model -> (T, C) array
    offset: Callable[[], int | None]


@dataclass(frozen=True)
class Outcome:
    session_id: str
    outputs: np.ndarray  # (T, out) float32; empty with `error`
    position: int
    error: ServiceError | None = None


async def push_items(runtime: Runtime, owner: str, items: list[Item], size: int) -> list[Outcome]:
    """Push every item, in order; `size` (bytes) decides whether decoding leaves the loop."""
    limit = runtime.settings.max_sequences_per_request
    if len(items) > limit:
        raise TooManySequences(
            f"the request has {len(items)} items; at most {limit} per request "
            "(max_sequences_per_request)"
        )
    if not items:
        raise InvalidInput("steps: give at least one item")
    handles = await runtime.sessions.resolve_many(owner, [item.session_id for item in items])
    decoded = await runtime.decode(size, lambda: _decode(items, handles))
    ready = [(i, d) for i, d in enumerate(decoded) if not isinstance(d, ServiceError)]
    results = await runtime.sessions.push_many([d for _, d in ready])
    merged: list = list(decoded)
    for (i, _), result in zip(ready, results, strict=True):
        merged[i] = result
    outcomes = []
    for item, result in zip(items, merged, strict=True):
        if isinstance(result, ServiceError):
            outcomes.append(Outcome(item.session_id, NO_OUTPUTS, -1, result))
        else:
            outcomes.append(Outcome(item.session_id, result.outputs, result.position))
    return outcomes


def _decode(
    items: list[Item], handles: list[SessionHandle | ServiceError]
) -> list[tuple[SessionHandle, np.ndarray, int | None] | ServiceError]:
    seen: set[str] = set()
    out: list[tuple[SessionHandle, np.ndarray, int | None] | ServiceError] = []
    for item, handle in zip(items, handles, strict=True):
        try:
            if item.session_id in seen:
                raise InvalidInput(
                    f"session {item.session_id!r} is named more than once in this request; "
                    "only its first item is applied (send its rows in one item, or in order "
                    "over several requests)"
                )
            seen.add(item.session_id)
            if isinstance(handle, ServiceError):
                raise handle
            out.append((handle, item.decode(handle.spec), item.offset()))
        except ServiceError as e:
            out.append(e)
    return out


def json_items(steps: list[inputs.ManyStep], max_rows: int) -> list[Item]:
    """Items of a JSON body: {"steps": [{"session_id", "inputs", "offset"?}, ...]}; an item
    of more than `max_rows` rows fails alone, before they are parsed."""
    return [
        Item(
            step.session_id,
            lambda spec, raw=step.inputs: inputs.rows(raw, spec, "inputs", max_rows=max_rows),
            lambda raw=step.offset: inputs.offset(raw),
        )
        for step in steps
    ]
