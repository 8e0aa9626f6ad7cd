"""What a StreamPool refuses with: its exceptions, and the largest position a stream may reach."""

from __future__ import annotations

# The largest position a stream may reach: 2**53, so that positions stay exact in every JSON
# client (a JavaScript number) and int64 arithmetic on them can never wrap.
MAX_POSITION = 2**53


class PoolFullError(RuntimeError):
    """No free slot is left in the pool."""


class SlotError(ValueError):
    """A slot is unknown, closed, or named twice in one call."""


class StateMismatchError(ValueError):
    """An exported state does not belong to this pool's model."""


class NonFiniteOutputError(ValueError):
    """The call would produce NaN or Inf outputs; it was refused and changed nothing."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows  # indices into the call's streams (step) or rows (push)
