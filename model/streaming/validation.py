"""Input validation and non-finite refusals of a StreamPool.

Inputs: shape, dtype, token-id range, finiteness and magnitude (`_rows`, and `_host_rows`, its
numpy-only fast path for the host kernels), and the position limit of an advance. The magnitude
bound (`max_input_abs`, `overflow_safe`) is computed when the pool is built (pool.py, from
model/numeric_range.py). Outputs: the helpers that find the rows or streams whose outputs or
ring writes would hold NaN or Inf, so that a call is refused before it changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.streaming.errors import MAX_POSITION


class InputValidation:
    """StreamPool's checks of the rows it is given and of the values a step would write."""

    def _rows(
        self,
        x: torch.Tensor | np.ndarray | Sequence,
        n: int | None,
        what: str,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Validate (n, in_channels) floats or (n,) token ids and move them to the pool's
        device (or `device`)."""
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = x.copy()  # e.g. decoded from a network buffer; torch wants writable memory
        x = torch.as_tensor(x)
        cfg = self.config
        if cfg.vocab_size is not None:
            if x.dim() != 1 or x.dtype not in (torch.int64, torch.int32):
                raise TypeError(
                    f"{what}: this model takes (rows,) int64 token ids, "
                    f"got {tuple(x.shape)} {x.dtype}"
                )
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= cfg.vocab_size):
                raise ValueError(f"{what}: token ids must be in [0, {cfg.vocab_size})")
        else:
            if x.dim() != 2 or x.shape[1] != cfg.in_channels:
                raise ValueError(
                    f"{what}: expected shape (rows, {cfg.in_channels}), got {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise TypeError(f"{what}: expected floating-point rows, got {x.dtype}")
            # One reduction answers both checks when the rows are fine: NaN fails `<=` too.
            if x.numel() and not _max_abs(x) <= self.input_limit:
                if not _all_finite(x):
                    raise ValueError(f"{what}: inputs must be finite (no NaN or Inf)")
                raise ValueError(
                    f"{what}: inputs must be within +-{self.input_limit:.3g}, the largest "
                    f"magnitude this model takes in {str(self.dtype).removeprefix('torch.')} "
                    "without overflowing"
                )
        if x.shape[0] == 0:
            raise ValueError(f"{what}: no rows given")
        if n is not None and x.shape[0] != n:
            raise ValueError(f"{what}: {x.shape[0]} rows for {n} slots")
        device = self.device if device is None else device
        if cfg.vocab_size is not None:
            return x.to(device, torch.int64, non_blocking=True)
        return x.to(device, self.dtype, non_blocking=True)

    def _host_rows(
        self, x: torch.Tensor | np.ndarray | Sequence, n: int, what: str = "step"
    ) -> np.ndarray:
        """`_rows` for the host kernels, as a writable C-contiguous numpy array: rows already in
        the pool's dtype and shape take a numpy-only path (torch ops between two fused steps
        cost more than the checks); anything else goes through `_rows`, which raises the right
        error. (One array layout, so the compiled kernel is compiled for one only.)"""
        tensor_ok = isinstance(x, torch.Tensor) and x.is_cpu and not x.requires_grad
        arr = x.numpy() if tensor_ok else x
        cfg = self.config
        plain = isinstance(arr, np.ndarray) and arr.flags.c_contiguous and arr.flags.writeable
        if not plain or arr.size == 0 or arr.shape[0] != n:
            pass
        elif cfg.vocab_size is None:
            shaped = arr.dtype == self._host_dtype and arr.shape == (n, cfg.in_channels)
            # As Python floats: a limit beyond the dtype's range must not be cast into it.
            if shaped and float(np.abs(arr).max()) <= self.input_limit:  # NaN fails this too
                return arr
        elif (
            arr.dtype == np.int64 and arr.ndim == 1 and 0 <= arr.min() <= arr.max() < cfg.vocab_size
        ):
            return arr
        rows = self._rows(x, n, what).numpy()
        return rows if rows.flags.c_contiguous and rows.flags.writeable else rows.copy()

    @property
    def input_limit(self) -> float:
        """The largest |input| accepted: max_input_abs, else the dtype's range."""
        if self.max_input_abs is not None:
            return self.max_input_abs
        return float(torch.finfo(self.dtype).max)

    def _check_advance(self, slot_np: np.ndarray, steps: int) -> None:
        if (self._positions[slot_np] > MAX_POSITION - steps).any():
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")

    def _nonfinite_ring_rows(self, slot_np: np.ndarray) -> list[int]:
        """Streams whose ring rows of this step hold NaN or Inf (a value a ReLU hid from the
        outputs would poison later steps): checked only without an overflow-safe bound."""
        writes = torch.from_numpy(self._ring_rows(slot_np)[0]).to(self.device)  # (layers, N)
        finite = torch.ones(slot_np.size, dtype=torch.bool, device=self.device)
        for layer, rows in zip(self._layers, writes, strict=True):
            finite &= torch.isfinite(layer.ring[rows]).all(dim=1)
        return torch.nonzero(~finite).flatten().tolist()


def _nonfinite_written(
    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], kept: list[torch.Tensor]
) -> list[int]:
    """Rows of a ragged call (by index into the call) whose ring writes are not finite."""
    bad: set[int] = set()
    for (_, _, values), rows in zip(writes, kept, strict=True):
        if not _all_finite(values):
            bad.update(rows[~torch.isfinite(values).all(dim=1)].tolist())
    return sorted(bad)


def _nonfinite_rows(y: torch.Tensor) -> list[int]:
    """Indices of the rows of y (rows, out) holding NaN or Inf; one host sync."""
    if _all_finite(y):
        return []
    return torch.nonzero(~torch.isfinite(y).all(dim=-1)).flatten().tolist()


def _max_abs(x: torch.Tensor) -> float:
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return float(np.abs(x.numpy()).max())
    return float(x.abs().max())


def _all_finite(x: torch.Tensor) -> bool:
    # numpy answers in about a microsecond for host rows; torch's reduction costs tens.
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.float16):
        return bool(np.isfinite(x.numpy()).all())
    return bool(torch.isfinite(x).all())
