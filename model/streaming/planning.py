"""Kernel planning of a StreamPool: which kernel runs a step of how many streams.

Per step the host does the bookkeeping (which slots are open, their positions). Which kernel
moves the rows and multiplies is decided once, at load (`kernel_for`; model/step_kernels.py and
docs/step_engine.md): on CPU, float32/float64, compiled kernels (numpy ones without numba);
elsewhere torch ops, whose index arithmetic runs on the pool's device, so a step issues a fixed
number of kernels per layer and never waits on the device.

`_plan_kernels` draws the lines at load: up to `fused_max_rows` streams through the compiled
fused kernel (model/fused_step.py), up to `numpy_max_rows` through numpy, above them "blas" or
torch (model/step_kernels.py); ragged advances of up to `fused_advance_rows` rows through the
fused kernel too, where `advance` (steps.py) allows it. A pool built with `cuda_graphs=True`
(model/cuda_graphs.py; its `GraphedStep` is made in pool.py) plans no host kernel: every step
runs as "graphs". `kernel_for(n)` answers which one a step of n streams takes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from model import fused_step
from model.step_kernels import NUMPY_MAX_MACS, numpy_view

STEP_KERNELS = ("auto", "torch", "numpy", "fused", "blas")

# What `StreamPool.kernel_for` names: the kernel a step of some number of streams runs.
StepKernel = Literal["graphs", "fused", "numpy", "blas", "torch"]
# Pushes of up to this many rows run as a ragged advance of their stream (k tap rows per row and
# layer); longer ones as one conv per layer over the window and the chunk, which costs less per
# row once the chunk is long (bench/ragged_push.py measures where they cross:
# docs/benchmarks/results/ragged_push.txt).
CHUNKED_PUSH_ROWS = 256


class KernelPlanning:
    """StreamPool's choice of step kernel per batch size, made once at load."""

    def _plan_kernels(self, step_kernel: str) -> None:
        """Decide once, at load, which kernel runs a step of how many streams."""
        self._numpy_plan = None
        self._skips_np = None
        self._fused_plan = None
        self._fused_checked = False
        self._blas_plan = None  # set: steps above the lines below take `step_blas`
        self.numpy_max_rows = 0  # steps of at most this many streams go through numpy
        self.fused_max_rows = 0  # ... through the compiled fused kernel (before numpy)
        self.fused_advance_rows = 0  # ragged advances of at most this many rows in all, too
        host_ok = self.device.type == "cpu" and self.dtype in (torch.float32, torch.float64)
        self._host_dtype = np.dtype(str(self.dtype).removeprefix("torch.")) if host_ok else None
        if step_kernel in ("numpy", "fused", "blas") and not host_ok:
            raise ValueError(
                f"the {step_kernel} step kernel needs a CPU pool of float32 or float64"
            )
        if step_kernel in ("fused", "blas") and not fused_step.AVAILABLE:
            raise ValueError(f"the {step_kernel} step kernel needs numba, which is not installed")
        if not host_ok or step_kernel == "torch" or self._graphs is not None:
            return
        self._history_np = self._history.numpy()
        self._embedding_np = self._embedding.numpy() if self._embedding is not None else None
        biggest = max(w.numel() for w in self._matrices())
        auto_numba = step_kernel == "auto" and fused_step.AVAILABLE
        if auto_numba or step_kernel == "blas":
            self._blas_plan = tuple(
                (r1.numpy(), w1, b1, r2.numpy(), w2, b2, ds, b.conv1.ring_len, b.conv1.dilation,
                 n1, n2, cond)
                for (r1, w1, b1, r2, w2, b2, ds, n1, n2, cond), b in zip(
                    self._step_plan, self._blocks, strict=True
                )
            )  # fmt: skip
            widest = max(layer.step_weight.shape[0] for layer in self._layers)  # k * C_in
            # torch's allocator aligns to 64 bytes (numpy's to 16): rows start on cache lines
            self._operand = torch.empty(self.capacity * widest, dtype=self.dtype).numpy()
        if auto_numba or step_kernel == "fused":
            narrow = biggest <= fused_step.FUSED_NARROW_MACS
            budget = fused_step.FUSED_NARROW_STEP_MACS if narrow else fused_step.FUSED_MAX_MACS
            rows = max(budget // biggest, 1) if auto_numba else self.capacity
            self.fused_max_rows = min(self.capacity, rows)
            # Ragged advances of up to `fused_advance_rows` rows in all take the same kernel
            # (`_advance_fused`): every advance of a narrow model, a few rows of a wider one.
            # Its buffers hold that many rows, whatever the capacity.
            if not auto_numba:
                self.fused_advance_rows = self.capacity
            elif narrow:
                self.fused_advance_rows = self.max_advance_rows
            else:
                self.fused_advance_rows = max(fused_step.FUSED_ADVANCE_MAX_MACS // biggest, 1)
            self._fused_plan = fused_step.fused_plan(
                [
                    (
                        layer.ring.numpy(),
                        layer.step_weight.numpy(),
                        layer.bias.numpy(),
                        layer.ring_len,
                    )
                    for layer in self._layers
                ],
                [block.conv1.dilation for block in self._blocks],
                self.config.kernel_size,
                [numpy_view(block.downsample) for block in self._blocks],
                numpy_view(self._head),
                self.config.in_channels,
                max(self.fused_max_rows, self.fused_advance_rows),
                self._act.code,
                None if self._skips is None else numpy_view(self._skips),
                self.config.gate,
                [numpy_view((block.norm1, block.norm2)) for block in self._blocks],
                self.config.keras_tcn,
                [numpy_view(block.cond) for block in self._blocks],
                None if self.config.vocab_size else (self._history_np, self.history_len),
            )
            # A step of float inputs without an output activation is checked, run and
            # committed in one compiled call (`StepPaths.step`).
            self._fused_checked = (
                self.config.vocab_size is None and self.config.output_activation == "none"
            )
            self._fused_limit = self.input_limit
        if step_kernel == "numpy" or (step_kernel == "auto" and not fused_step.AVAILABLE):
            self._numpy_plan = numpy_view(self._step_plan)
            self._skips_np = numpy_view(self._skips) if self._skips is not None else None
            self._head_np = numpy_view(self._head) if self._head is not None else None
            rows = self.capacity if step_kernel == "numpy" else NUMPY_MAX_MACS // biggest
            self.numpy_max_rows = rows

    def kernel_for(self, n: int) -> StepKernel:
        """Which kernel a step of n streams runs: "graphs" (CUDA graphs), "fused", "numpy",
        "blas" or "torch" (docs/step_engine.md); decided by the pool's settings at load."""
        if n < 1:
            raise ValueError(f"a step advances at least one stream, not {n}")
        if self._graphs is not None:
            return "graphs"
        if n <= self.fused_max_rows:
            return "fused"
        if n <= self.numpy_max_rows:
            return "numpy"
        return "blas" if self._blas_plan is not None else "torch"
