"""Bounds on a JSON body's shape, checked in one pass over its bytes before anything is built.

A request body's cost is set by its shape, not only its size: 16 MiB of `[[0,0]],` is two
million one-row sequences, each a Python list before any count can be checked, and ~1,000
nested brackets make a recursive parser raise RecursionError. `check` reads the bytes once,
tracking nesting depth (strings and their escapes skipped) and counting the containers (arrays
and objects) opened at each depth, and stops at the first bound passed: the parser then only
ever sees bodies whose depth and counts are within the request limits.

A body's depths are fixed by its schema: in `{"inputs": [[row, ...], ...]}` the object is depth
1, `inputs` depth 2, each sequence depth 3 and each row depth 4. A `Count` says how many
containers a depth may hold. Counting containers instead of values is exact for a valid body
and an upper bound for an invalid one (which its parser then refuses for what it is).

Compiled with numba (the GIL is released, so a large body scanned on the decode thread leaves
the event loop running); without numba the same loop runs in Python, about 100x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # numba is a dependency; the model layer falls back without it, and so does this
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

# Deepest nesting any body of this API takes: /v2's nested `data` of a [batch, time, channels]
# tensor inside an input object inside `inputs` is 6 levels; 16 leaves room and stays far below
# Python's recursion limit wherever the parser runs.
MAX_DEPTH = 16
UNLIMITED = -1
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN_ARRAY, _OPEN_OBJECT = ord("["), ord("{")
_CLOSE_ARRAY, _CLOSE_OBJECT = ord("]"), ord("}")


@dataclass(frozen=True)
class Count:
    """At most `limit` containers at `depth`; `what` names them in the refusal, which states
    `shown` as the limit (the setting's value, where one thing takes several containers)."""

    depth: int
    limit: int
    what: str
    shown: int | None = None


@dataclass(frozen=True)
class Exceeded:
    """The first bound a body passed: its `Count`, or None for the depth itself."""

    count: Count | None


def _scan(data: np.ndarray, max_depth: int, limits: np.ndarray) -> tuple[int, int]:
    """-> (0, 0) within bounds; (-1, at) deeper than max_depth; (depth, at) for a count passed
    at byte `at`. `limits[d]`: most containers at depth d (UNLIMITED: any)."""
    counts = np.zeros(max_depth + 1, dtype=np.int64)
    depth = 0
    in_string = False
    escaped = False
    for at in range(data.shape[0]):
        c = data[at]
        if in_string:
            if escaped:
                escaped = False
            elif c == _BACKSLASH:
                escaped = True
            elif c == _QUOTE:
                in_string = False
        elif c == _QUOTE:
            in_string = True
        elif c in (_OPEN_ARRAY, _OPEN_OBJECT):
            depth += 1
            if depth > max_depth:
                return -1, at
            counts[depth] += 1
            limit = limits[depth]
            if limit != UNLIMITED and counts[depth] > limit:
                return depth, at
        elif c in (_CLOSE_ARRAY, _CLOSE_OBJECT):
            if depth == 0:  # unbalanced: the parser says where
                return 0, 0
            depth -= 1
    return 0, 0


if numba is not None:
    _scan = numba.njit(nogil=True, cache=False)(_scan)


def check(data: bytes | memoryview, counts: tuple[Count, ...] = ()) -> Exceeded | None:
    """None if `data` nests at most MAX_DEPTH deep and passes no count; else what it passed."""
    limits = np.full(MAX_DEPTH + 1, UNLIMITED, dtype=np.int64)
    for count in counts:
        if not 0 < count.depth <= MAX_DEPTH:
            raise ValueError(f"a count at depth {count.depth}, outside 1..{MAX_DEPTH}")
        limits[count.depth] = count.limit
    depth, _ = _scan(np.frombuffer(data, dtype=np.uint8), MAX_DEPTH, limits)
    if depth == 0:
        return None
    if depth == -1:
        return Exceeded(None)
    return Exceeded(next(c for c in counts if c.depth == depth))


def warm() -> None:
    """Compile the scan now (about 0.2 s with numba), not on the first request."""
    check(b'{"a": [[1, "]"]]}', (Count(3, 1, "rows"),))
