"""Slot bookkeeping of a StreamPool: open, close, reset, positions, the free list, slot checks.

A slot is one stream's share of every ring buffer (rings.py). The pool keeps, per slot, whether
it is open (`_open`) and the stream's position (`_positions`, timesteps consumed), and a stack
of free slots (`_free`); `_slot_array` validates the slots of one batched call, and `history`
reads a stream's last inputs back (to rebuild it elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.streaming.errors import MAX_POSITION, PoolFullError, SlotError


class SlotBookkeeping:
    """StreamPool's slots: which are open, at which position, and which are free."""

    def __len__(self) -> int:
        """Open streams."""
        return self.capacity - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def open(self, position: int = 0, embedding: object = None) -> int:
        """A fresh slot: a stream at `position` whose whole past is the zero left padding.

        With position > 0 this is the start of a restore: push the last inputs of the stream
        being rebuilt (see `history`) and the state equals the original's.
        `embedding`: the stream's static embedding, required by (and only by) a model with
        embedding_dims: one vector of sum(embedding_dims) floats, or one per entry
        (conditioning.py); kept until the stream closes.
        """
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
            raise ValueError(f"position must be an integer >= 0, got {position!r}")
        if not 0 <= position <= MAX_POSITION:  # checked before a slot is taken
            raise ValueError(f"position must be in [0, {MAX_POSITION}], got {position}")
        conditioned = self._block_embeddings is not None
        if conditioned or embedding is not None:
            e, rows = self._embedding_rows(embedding)  # checked before a slot is taken too
        if not self._free:
            raise PoolFullError(f"all {self.capacity} stream slots are in use")
        slot = self._free.pop()
        self._clear(slot)
        if conditioned:
            self._set_embedding(slot, e, rows)
        self._positions[slot] = position
        self._open[slot] = True
        return slot

    def close(self, slot: int) -> None:
        self._check_slot(slot)
        self._open[slot] = False
        if self._block_embeddings is not None:
            self._clear_embedding(slot)
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Back to position 0, as if just opened (with the same embedding, if any)."""
        self._check_slot(slot)
        self._clear(slot)

    def position(self, slot: int) -> int:
        """Timesteps this stream has consumed."""
        self._check_slot(slot)
        return int(self._positions[slot])

    def is_open(self, slot: int) -> bool:
        return (
            isinstance(slot, (int, np.integer))
            and not isinstance(slot, (bool, np.bool_))
            and 0 <= slot < self.capacity
            and bool(self._open[slot])
        )

    def _clear(self, slot: int) -> None:
        for layer in self._layers:
            layer.ring[slot * layer.ring_len : (slot + 1) * layer.ring_len].zero_()
        self._history[slot * self.history_len : (slot + 1) * self.history_len].zero_()
        self._positions[slot] = 0

    @torch.no_grad()
    def history(self, slot: int) -> torch.Tensor:
        """The stream's last min(position, R - 1) inputs, oldest first, on the CPU.

        A TCN's output at t depends on inputs t - R + 1 .. t only, so every future output of
        this stream is a function of these rows (and of its embedding, if the model takes one):
        `open(position - len(rows), embedding=embedding_of(slot))` followed by `push(rows)`
        rebuilds the stream exactly, in any pool of the same model.
        """
        self._check_slot(slot)
        pos, size = int(self._positions[slot]), self.history_len
        rows = np.arange(pos - min(pos, size), pos) % max(size, 1) + slot * size
        return self._history[torch.from_numpy(rows).to(self.device)].cpu()

    def _check_slot(self, slot: int) -> None:
        if not self.is_open(slot):
            raise SlotError(f"slot {slot!r} is not an open stream of this pool")

    def _slot_array(self, slots: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(slots, torch.Tensor):
            slots = slots.detach().cpu().numpy()
        arr = np.asarray(slots)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise SlotError(f"slots must be a non-empty 1-D sequence of ints, got {arr!r}")
        arr = arr.astype(np.int64, copy=False)
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = arr.copy()  # one array layout for the compiled kernels: each compiles once
        # Few numpy calls, each a microsecond or so: this runs on every step.
        if arr.size == 1:
            if not (0 <= arr[0] < self.capacity and self._open[arr[0]]):
                raise SlotError(f"slots {arr.tolist()} are not open streams of this pool")
            return arr
        if arr.min() < 0 or arr.max() >= self.capacity or not self._open[arr].all():
            bad = (arr < 0) | (arr >= self.capacity)
            if not bad.any():
                bad = ~self._open[arr]
            raise SlotError(f"slots {arr[bad].tolist()} are not open streams of this pool")
        # Duplicates without sorting: write each entry's index at its slot; a slot named twice
        # keeps only its last index.
        order = self._iota[: arr.size]
        self._slot_marks[arr] = order
        if not np.array_equal(self._slot_marks[arr], order):
            raise SlotError("a slot appears more than once in one step; push its rows in order")
        return arr
