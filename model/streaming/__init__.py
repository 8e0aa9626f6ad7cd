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
- pool.py: StreamPool, which ties them together.

Every public name is importable from here (and from `model`).
"""

from model.streaming.errors import (
    MAX_POSITION,
    NonFiniteOutputError,
    PoolFullError,
    SlotError,
    StateMismatchError,
)
from model.streaming.planning import STEP_KERNELS, StepKernel
from model.streaming.pool import StreamPool
from model.streaming.state import STATE_FORMAT

__all__ = [
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
