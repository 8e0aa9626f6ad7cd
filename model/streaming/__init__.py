"""StreamPool: many streams of one TCN advanced together from preallocated ring buffers.

A package, one concern a file (StreamPool itself is in pool.py, built from the others):

- errors.py: the exceptions it raises and `MAX_POSITION`;
- slots.py: slot bookkeeping: open, close, reset, positions, the free list, slot checks;
- validation.py: input validation (shape, dtype, range, non-finite) and non-finite refusals;
- planning.py: kernel planning: which step kernel (fused, numpy, blas, torch, CUDA graphs) runs
  a step of how many streams, decided at load;
- rings.py: the ring buffers: their layout, building them from a TCN, their row arithmetic;
- steps.py: the paths that advance streams and update the rings: step, advance, push;
- state.py: export and import of one stream's state;
- conditioning.py: a conditioned model's per-stream embeddings, as per-slot bias rows;
- pool.py: StreamPool, which ties them together.

Every public name is importable from here (and from `model`); the pool's on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model._lazy import lazy_attributes
from model.streaming.errors import (
    MAX_POSITION,
    NonFiniteOutputError,
    PoolFullError,
    SlotError,
    StateMismatchError,
)

if TYPE_CHECKING:
    from model.streaming.planning import CHUNKED_PUSH_ROWS, STEP_KERNELS, StepKernel
    from model.streaming.pool import StreamPool
    from model.streaming.state import STATE_FORMAT

# Loaded on first use (PEP 562): the exceptions above need no torch, the pool does.
_LAZY = {
    "CHUNKED_PUSH_ROWS": "model.streaming.planning",
    "STEP_KERNELS": "model.streaming.planning",
    "StepKernel": "model.streaming.planning",
    "StreamPool": "model.streaming.pool",
    "STATE_FORMAT": "model.streaming.state",
}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "CHUNKED_PUSH_ROWS",
    "MAX_POSITION",
    "STATE_FORMAT",
    "STEP_KERNELS",
    "NonFiniteOutputError",
    "PoolFullError",
    "SlotError",
    "StateMismatchError",
    "StepKernel",
    "StreamPool",
]
