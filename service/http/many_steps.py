"""Pushes to many sessions at once, whatever carried them: POST /v1/steps and WS /v1/streams.

The edge decodes each item for its session's model, the session manager pushes them together
(so each model advances them in one batched call), and each item ends as its outputs and
position or as its own error: one bad item never fails the others.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np

from service.engine.runtime import Runtime
from service.models import inputs
from service.protocol.errors import InvalidInput, ServiceError, TooManySequences
from service.sessions.state import SessionHandle

NO_OUTPUTS = np.zeros((0, 0), dtype=np.float32)


class Item(NamedTuple):
    """One push as it arrived: rows not yet checked against the session's model."""

    session_id: str
    # JSON rows (those of one float model are parsed together), or a binary frame's float32
    # (T, C) rows, not yet checked against the model.
    rows: msgspec.Raw | np.ndarray
    offset: msgspec.Raw | int | None  # JSON, or a binary header's (None: no offset)


class Outcome(NamedTuple):
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
    max_rows = runtime.limits.max_timesteps
    decoded = await runtime.decode(size, lambda: _decode(items, handles, max_rows))
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
    items: list[Item], handles: list[SessionHandle | ServiceError], max_rows: int
) -> list[tuple[SessionHandle, np.ndarray, int | None] | ServiceError]:
    seen: set[str] = set()
    out: list = []
    together: dict[int, tuple[inputs.InputSpec, list[int]]] = {}  # JSON rows, by spec
    for i, (item, handle) in enumerate(zip(items, handles, strict=True)):
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
            rows, spec = item.rows, handle.spec
            offset = (  # judged first, as a single push's (POST /v1/sessions/{id}/steps)
                inputs.offset(item.offset)
                if isinstance(item.offset, msgspec.Raw)
                else inputs.check_offset(item.offset)
            )
            if isinstance(rows, np.ndarray):
                out.append((handle, inputs.check_array(rows, spec, "inputs"), offset))
            elif spec.vocab_size is not None:
                out.append((handle, inputs.rows(rows, spec, "inputs", max_rows=max_rows), offset))
            else:
                together.setdefault(id(spec), (spec, []))[1].append(i)
                out.append((handle, None, offset))  # its rows: below, with the others
        except ServiceError as e:
            out.append(e)
    for spec, indices in together.values():
        raws = [items[i].rows for i in indices]
        for i, x in zip(indices, inputs.rows_many(raws, spec, "inputs", max_rows), strict=True):
            out[i] = x if isinstance(x, ServiceError) else (out[i][0], x, out[i][2])
    return out


def json_items(steps: list[inputs.ManyStep]) -> list[Item]:
    """Items of a JSON body: {"steps": [{"session_id", "inputs", "offset"?}, ...]}; an item
    of more than max_timesteps_per_request rows fails alone, before they are parsed."""
    return [Item(step.session_id, step.inputs, step.offset) for step in steps]
