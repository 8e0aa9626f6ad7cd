"""Open Inference Protocol requests served by the same session store and model workers as /v1.

A request without a sequence runs its batch through `ModelEntry.predict`, the forward of
/v1/models/{name}/predict. A request of a sequence is a push to that sequence's session
(`Sequence.session_id`), exactly as POST /v1/sessions/{id}/steps: the same limits, per-key
quota, offsets and replay of an exact retry. `sequence_start` opens the session with the
request's rows (as POST /v1/sessions with `prefix`); `sequence_end` closes it after the push.
Ended ids are remembered (as many as expired ones), so a late request on one says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

from service.engine.runtime import Runtime
from service.oip.decode import InferRequest, Sequence
from service.protocol.errors import (
    InvalidInput,
    OffsetConflict,
    SessionExists,
    SessionExpired,
    SessionNotFound,
)
from service.sessions.state import RecentIds

if TYPE_CHECKING:
    from service.models.registry import ModelEntry


class OipInference:
    """Runs decoded infer requests; holds nothing but the memory of ended sequences."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime
        self._ended = RecentIds(runtime.settings.expired_memory)
        self._tasks: set[asyncio.Task] = set()

    async def infer(
        self, owner: str, entry: ModelEntry, request: InferRequest
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """(B, T, out) float32 outputs and the response's parameters."""
        if request.sequence is None:
            outputs = await entry.predict(list(request.x), last_only=False)
            return np.stack(outputs), {}  # (B, T, out)
        sequence, x = request.sequence, request.x[0]
        if sequence.start or sequence.end:
            # Shielded as a whole: a client gone between the push and the end must not leave
            # an ended sequence open. A plain push is recorded by the session manager whether or
            # not its client stays.
            task = asyncio.ensure_future(self._step(owner, entry, sequence, x))
            self._tasks.add(task)
            task.add_done_callback(self._forget)
            position, y = await asyncio.shield(task)
        else:
            position, y = await self._push(owner, entry, sequence, x, sequence.offset)
        return y[None], {"sequence_position": position}  # (1, T, out)

    def _forget(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure whose client left is not "never retrieved"

    async def _step(
        self, owner: str, entry: ModelEntry, sequence: Sequence, x: np.ndarray
    ) -> tuple[int, np.ndarray]:
        sessions = self._runtime.sessions
        session_id = sequence.session_id
        key = (owner, session_id)
        if sequence.start:
            self._runtime.check_accepting()
            try:
                session, y = await sessions.create(owner, entry.name, session_id, prefix=x)
                self._ended.discard(key)
                position = session.position
            except SessionExists:
                position, y = await self._restart(owner, entry, sequence, x)
        else:
            position, y = await self._push(owner, entry, sequence, x, sequence.offset)
        if sequence.end:
            with contextlib.suppress(SessionNotFound, SessionExpired):  # retired meanwhile
                await sessions.delete(owner, session_id)
            self._ended.add(key)
        return position, y

    async def _restart(
        self, owner: str, entry: ModelEntry, sequence: Sequence, x: np.ndarray
    ) -> tuple[int, np.ndarray]:
        """sequence_start for an open sequence: the retry of the request that started it is
        answered again (nothing changes); anything else is a conflict."""
        try:
            return await self._push(owner, entry, sequence, x, 0)
        except OffsetConflict as e:
            raise OffsetConflict(
                f"{sequence.describe()} is already open, at position {e.position}, and this "
                "request is not a retry of the one that started it: continue it without "
                "sequence_start, or end it first",
                e.position,
            ) from None

    async def _push(
        self,
        owner: str,
        entry: ModelEntry,
        sequence: Sequence,
        x: np.ndarray,
        offset: int | None,
    ) -> tuple[int, np.ndarray]:
        sessions = self._runtime.sessions
        session_id = sequence.session_id
        try:
            handle = await sessions.resolve(owner, session_id)  # from the store if need be
            if handle.model != entry.name:
                raise InvalidInput(
                    f"{sequence.describe()} is open on model {handle.model!r}, not {entry.name!r}"
                )
            result = await sessions.push(handle, x, offset)
        except SessionExpired:
            raise SessionExpired(
                f"{sequence.describe()} expired: it was idle longer than its TTL "
                f"(session_ttl_s); start it again with sequence_start"
            ) from None
        except SessionNotFound:
            if (owner, session_id) in self._ended:
                raise SessionNotFound(
                    f"{sequence.describe()} has ended (a request with sequence_end closed it); "
                    "start it again with sequence_start"
                ) from None
            raise SessionNotFound(
                f"unknown {sequence.describe()}: no open sequence has this id (open one with "
                "sequence_start)"
            ) from None
        return result.position, result.outputs
