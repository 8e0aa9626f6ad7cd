"""StreamPool: many streams of one TCN advanced together from preallocated ring buffers.

Layout. Every causal conv layer (kernel k, dilation d) owns one ring tensor of shape
(capacity * L, C_in) with L = (k - 1) * d + 1: for each slot, L time-major rows of C_in
contiguous values, the layer's whole receptive window (the current input and the (k-1)*d before
it). The input of time t lives at row `slot * L + t % L`. A step first writes the new row, then
gathers the k dilated taps `t - j*d` into one (N, k*C_in) operand: each tap is a contiguous run
of C_in values, so the gather reads k short contiguous rows per stream. A channel-major layout
(C_in, L) would need C_in strided reads per tap instead. Keeping the current input in the ring
(L rather than (k-1)*d rows) lets the torch kernel gather all k taps with one index op, without a
concatenation; rows of times before 0 are the zeros the ring starts with, which is the full
forward's left padding.

Per step the host does the bookkeeping (which slots are open, their positions). Which kernel
moves the rows and multiplies is decided once, at load (`kernel_for`; model/step_kernels.py and
docs/step_engine.md): on CPU, float32/float64, compiled kernels (numpy ones without numba);
elsewhere torch ops, whose index arithmetic runs on the pool's device, so a step issues a fixed
number of kernels per layer and never waits on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from model import fused_step
from model.cuda_graphs import GraphedStep
from model.numeric_range import safe_input_bound
from model.ragged import ragged_forward, ragged_plan
from model.step_kernels import NUMPY_MAX_MACS, numpy_view, step_blas, step_numpy, step_torch
from model.tcn import TCN, apply_output_activation

STATE_FORMAT = "tcnserve.stream-state/1"

STEP_KERNELS = ("auto", "torch", "numpy", "fused", "blas")

# What `StreamPool.kernel_for` names: the kernel a step of some number of streams runs.
StepKernel = Literal["graphs", "fused", "numpy", "blas", "torch"]

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


@dataclass(frozen=True)
class _CausalLayer:
    """One dilated causal conv, in the two forms the pool uses."""

    conv_weight: torch.Tensor  # (C_out, C_in, k): chunked pushes run F.conv1d
    step_weight: torch.Tensor  # (k * C_in, C_out): taps oldest first, for one addmm per step
    bias: torch.Tensor  # (C_out,)
    dilation: int
    ring: torch.Tensor  # (capacity * L, C_in)
    ring_len: int  # L = (k - 1) * d + 1
    past_offsets: torch.Tensor  # (L - 1,) offsets -(L-1) .. -1: the past rows in time order


@dataclass(frozen=True)
class _Block:
    conv1: _CausalLayer
    conv2: _CausalLayer
    downsample: tuple[torch.Tensor, torch.Tensor] | None  # (C_in, C_out) weight, bias


class StreamPool:
    """A fixed number of stream slots of one model on one device.

    Not thread-safe: drive it from one thread (the service's model worker does).
    """

    def __init__(
        self,
        net: TCN,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        step_kernel: str = "auto",
        max_advance_rows: int = 1024,
        cuda_graphs: bool = False,
    ):
        """`step_kernel`: "auto" runs small steps on CPU through the compiled fused kernel
        (model/fused_step.py; numpy's where numba is absent), larger ones through "blas"
        (compiled ring gathers, torch matmuls; torch where numba is absent) and any other
        device or dtype through torch (see model/step_kernels.py); "torch", "numpy", "fused"
        or "blas" forces one (tests use each).
        `max_advance_rows`: the most rows one `advance` call may carry (its scratch rows are
        preallocated in every layer's ring tensor). `cuda_graphs`: run `step` as captured CUDA
        graphs, one per batch-size bucket (model/cuda_graphs.py; its outputs come back on the
        CPU); on a CPU pool the same bucketed static-buffer step runs uncaptured, for tests."""
        if step_kernel not in STEP_KERNELS:
            raise ValueError(f"step_kernel must be one of {STEP_KERNELS}, got {step_kernel!r}")
        if cuda_graphs and step_kernel not in ("auto", "torch"):
            raise ValueError(f"cuda_graphs=True runs its own step; step_kernel={step_kernel!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        ref = next(net.parameters())
        self.device = torch.device(device) if device is not None else ref.device
        self.dtype = dtype if dtype is not None else ref.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")
        self.config = net.config
        self.capacity = capacity
        if isinstance(max_advance_rows, bool) or not isinstance(max_advance_rows, int):
            raise ValueError(f"max_advance_rows must be an integer, got {max_advance_rows!r}")
        self.max_advance_rows = max(1, max_advance_rows)
        self.fingerprint = _fingerprint(net)
        # Inputs above this magnitude are refused: below it no intermediate value can overflow
        # (model/numeric_range.py). None: no useful bound (float16, or a token model, whose ids
        # are safe when its embedding is within the bound); outputs are still checked.
        bound = safe_input_bound(net, self.dtype)
        self.max_input_abs = bound if net.config.vocab_size is None else None
        self.overflow_safe = bound is not None and (
            net.embedding is None or float(net.embedding.weight.detach().abs().max()) <= bound
        )
        self._open = np.zeros(capacity, dtype=bool)
        self._positions = np.zeros(capacity, dtype=np.int64)
        self._free = list(range(capacity - 1, -1, -1))  # a stack: open() pops the lowest slot
        # CUDA graphs pad their buckets with rows of one extra slot that no stream ever gets.
        self._slots_held = capacity + 1 if cuda_graphs else capacity
        self._iota = np.arange(capacity, dtype=np.int64)
        self._slot_marks = np.zeros(capacity, dtype=np.int64)  # scratch of `_slot_array`
        with torch.no_grad():
            self._build(net)
        self._graphs = GraphedStep(self, pad_slot=capacity) if cuda_graphs else None
        self._plan_kernels(step_kernel)

    def _plan_kernels(self, step_kernel: str) -> None:
        """Decide once, at load, which kernel runs a step of how many streams."""
        self._numpy_plan = None
        self._fused_plan = None
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
                (r1.numpy(), w1, b1, r2.numpy(), w2, b2, ds, b.conv1.ring_len, b.conv1.dilation)
                for (r1, w1, b1, r2, w2, b2, ds), b in zip(
                    self._step_plan, self._blocks, strict=True
                )
            )
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
            )
        if step_kernel == "numpy" or (step_kernel == "auto" and not fused_step.AVAILABLE):
            self._numpy_plan = numpy_view(self._step_plan)
            self._head_np = numpy_view(self._head) if self._head is not None else None
            rows = self.capacity if step_kernel == "numpy" else NUMPY_MAX_MACS // biggest
            self.numpy_max_rows = rows

    def _build(self, net: TCN) -> None:
        cfg, dev, dt = self.config, self.device, self.dtype
        k = cfg.kernel_size

        def layer(conv: torch.nn.Conv1d, dilation: int) -> _CausalLayer:
            w = conv.weight.detach().to(
                dev, dt, copy=True
            )  # (C_out, C_in, k); folds weight norm if present
            c_out, c_in, _ = w.shape
            ring_len = (k - 1) * dilation + 1
            return _CausalLayer(
                conv_weight=w.contiguous(),
                step_weight=w.permute(2, 1, 0).reshape(k * c_in, c_out).contiguous(),
                bias=conv.bias.detach().to(dev, dt, copy=True).contiguous(),
                dilation=dilation,
                # capacity * L ring rows, then the scratch rows of `advance` (model/ragged.py)
                ring=torch.zeros(
                    self._slots_held * ring_len + self.max_advance_rows, c_in, device=dev, dtype=dt
                ),
                ring_len=ring_len,
                past_offsets=torch.arange(1 - ring_len, 0, device=dev),
            )

        blocks = []
        for block, dilation in zip(net.blocks, cfg.dilations, strict=True):
            ds = None
            if block.downsample is not None:
                ds = (
                    block.downsample.weight.detach()[:, :, 0].T.to(dev, dt, copy=True).contiguous(),
                    block.downsample.bias.detach().to(dev, dt, copy=True),
                )
            blocks.append(_Block(layer(block.conv1, dilation), layer(block.conv2, dilation), ds))
        self._blocks: tuple[_Block, ...] = tuple(blocks)
        self._layers = tuple(layer for b in blocks for layer in (b.conv1, b.conv2))
        # Per layer: how far back each tap reaches (oldest first), and the ring length.
        dilations = np.array([[layer.dilation] for layer in self._layers])  # (layers, 1)
        self._tap_offsets_np = (dilations * np.arange(k - 1, -1, -1))[:, None, :]  # (layers,1,k)
        self._ring_lengths_np = np.array([[layer.ring_len] for layer in self._layers])
        self._tap_lengths_np = self._ring_lengths_np[:, :, None]  # (layers, 1, 1)
        self._scratch_at = [self._slots_held * layer.ring_len for layer in self._layers]
        self._scratch_at_np = np.array(self._scratch_at)[:, None, None]  # (layers, 1, 1)
        self._tap_offsets = torch.from_numpy(self._tap_offsets_np).to(dev)
        self._ring_lengths = torch.from_numpy(self._ring_lengths_np).to(dev)  # (layers, 1)
        # Flat per-block operands for the step loop: no attribute lookups on the hot path.
        self._step_plan = tuple(
            (
                b.conv1.ring,
                b.conv1.step_weight,
                b.conv1.bias,
                b.conv2.ring,
                b.conv2.step_weight,
                b.conv2.bias,
                b.downsample,
            )
            for b in self._blocks
        )
        self._embedding = (
            net.embedding.weight.detach().to(dev, dt, copy=True)
            if net.embedding is not None
            else None
        )
        # The last R - 1 raw inputs of each stream: all a stream's future outputs depend on,
        # so they rebuild its state anywhere (see `history`). Token models keep the ids.
        self.history_len = cfg.receptive_field - 1
        shape = (self._slots_held * self.history_len,)
        if cfg.vocab_size is None:
            shape += (cfg.in_channels,)
        self._history = torch.zeros(
            shape, device=dev, dtype=dt if cfg.vocab_size is None else torch.int64
        )
        self._head = None
        if net.head is not None:
            self._head = (
                net.head.weight.detach().T.to(dev, dt, copy=True).contiguous(),
                net.head.bias.detach().to(dev, dt, copy=True),
            )

    def _matrices(self) -> list[torch.Tensor]:
        """Every weight matrix a step multiplies by."""
        mats = [layer.step_weight for layer in self._layers]
        mats += [b.downsample[0] for b in self._blocks if b.downsample is not None]
        return mats + ([self._head[0]] if self._head is not None else [])

    # ----- slot bookkeeping ------------------------------------------------------------------

    def __len__(self) -> int:
        """Open streams."""
        return self.capacity - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def state_bytes_per_stream(self) -> int:
        """Bytes of conv ring buffer one stream holds: sum over conv layers of L * C_in values."""
        return sum(layer.ring_len * layer.ring.shape[1] for layer in self._layers) * (
            torch.finfo(self.dtype).bits // 8
        )

    @property
    def history_bytes_per_stream(self) -> int:
        """Bytes of the input history (last R - 1 raw inputs) one stream keeps."""
        return self._history[: self.history_len].numel() * self._history.element_size()

    def open(self, position: int = 0) -> int:
        """A fresh slot: a stream at `position` whose whole past is the zero left padding.

        With position > 0 this is the start of a restore: push the last inputs of the stream
        being rebuilt (see `history`) and the state equals the original's.
        """
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
            raise ValueError(f"position must be an integer >= 0, got {position!r}")
        if not 0 <= position <= MAX_POSITION:  # checked before a slot is taken
            raise ValueError(f"position must be in [0, {MAX_POSITION}], got {position}")
        if not self._free:
            raise PoolFullError(f"all {self.capacity} stream slots are in use")
        slot = self._free.pop()
        self._clear(slot)
        self._positions[slot] = position
        self._open[slot] = True
        return slot

    def close(self, slot: int) -> None:
        self._check_slot(slot)
        self._open[slot] = False
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Back to position 0, as if just opened."""
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
        this stream is a function of these rows: `open(position - len(rows))` followed by
        `push(rows)` rebuilds the stream exactly, in any pool of the same model.
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

    # ----- inputs ----------------------------------------------------------------------------

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

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self._embedding) if self._embedding is not None else x

    def _finish(self, h: torch.Tensor) -> torch.Tensor:  # (rows, C) -> (rows, out)
        if self._head is not None:
            h = torch.addmm(self._head[1], h, self._head[0])
        return apply_output_activation(h, self.config.output_activation, dim=-1)

    # ----- the hot paths ---------------------------------------------------------------------

    def _ring_rows(
        self, slot_np: np.ndarray, per_block: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Host-side ring rows of one step, every layer at once (a few numpy ops).

        taps (layers, N, k): the rows of the k taps, oldest first; writes (layers, N): the row
        of time t, which is the last tap (a view). `per_block`: one entry per block instead,
        as a block's two convs share dilation and ring length, hence their rows.
        """
        pos = self._positions[slot_np]
        step = 2 if per_block else 1
        lengths = self._tap_lengths_np[::step]  # (layers, 1, 1)
        taps = (pos[:, None] - self._tap_offsets_np[::step]) % lengths
        taps += slot_np[:, None] * lengths
        return taps[:, :, -1], taps

    def _device_ring_rows(
        self, slot_np: np.ndarray, per_block: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same on the pool's device: only 2N integers cross the bus."""
        pos = self._positions[slot_np]
        where = torch.from_numpy(np.stack([slot_np, pos])).to(self.device, non_blocking=True)
        s, t = where[0], where[1]
        step = 2 if per_block else 1
        lengths = self._ring_lengths[::step]
        base = s * lengths
        writes = torch.remainder(t, lengths).add_(base)
        taps = torch.remainder(t[:, None] - self._tap_offsets[::step], lengths[:, :, None])
        return writes, taps.add_(base[:, :, None])

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

    def step(
        self, slots: Sequence[int] | np.ndarray | torch.Tensor, x: torch.Tensor | np.ndarray
    ) -> torch.Tensor:
        """Advance N distinct streams by one timestep: x (N, in_channels) -> y (N, out)."""
        slot_np = self._slot_array(slots)
        n = slot_np.size
        kernel = self.kernel_for(n)
        if kernel == "graphs":
            return self._step_graphed(slot_np, x)
        on_host = kernel in ("fused", "numpy")
        x_np = self._host_rows(x, n) if on_host else None
        if not on_host:
            x = self._rows(x, n, "step")
        positions = self._positions[slot_np]
        if positions.max() >= MAX_POSITION:
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        # The ring rows of time t are written during the step, but nothing reads them before
        # the position passes t: a refused step (non-finite outputs) leaves the stream as it was
        # as long as the input history and the positions are only written after the check.
        if kernel == "fused":
            # Float models without an output activation record the history and positions in
            # the same compiled call, once the step is known to be finite.
            commit = self._embedding is None and self.config.output_activation == "none"
            h = self._embedding_np[x_np] if self._embedding is not None else x_np
            y_np, finite = fused_step.fused_step(
                self._fused_plan,
                slot_np,
                positions,
                h,
                (self._history_np, self.history_len, self._positions) if commit else None,
            )
            y = apply_output_activation(
                torch.from_numpy(y_np), self.config.output_activation, dim=-1
            )
            if finite and commit:
                return y
            bad = [] if finite and self.config.output_activation == "none" else _nonfinite_rows(y)
            if not bad and not finite:
                bad = self._nonfinite_ring_rows(slot_np)
        else:
            written_finite = False  # not known: look at the ring rows if it matters
            if kernel == "numpy":
                y = torch.from_numpy(self._step_numpy(slot_np, x_np))
                y = apply_output_activation(y, self.config.output_activation, dim=-1)
            elif kernel == "blas":
                with torch.inference_mode():
                    h, written_finite = step_blas(
                        self._blas_plan, slot_np, positions, self._embed(x), self._operand
                    )
                    y = self._finish(h)
            else:
                with torch.inference_mode():
                    y = self._finish(self._step_torch(slot_np, x))
            bad = _nonfinite_rows(y)
            if not bad and not self.overflow_safe and not written_finite:
                bad = self._nonfinite_ring_rows(slot_np)
        if bad:
            raise NonFiniteOutputError(
                f"the outputs of streams {bad} would not be finite; the step was refused", bad
            )
        if self.history_len:
            remember = positions % self.history_len + slot_np * self.history_len
            if on_host:
                self._history_np[remember] = x_np
            else:
                with torch.inference_mode():
                    rows = torch.from_numpy(remember).to(self.device)
                    self._history.index_copy_(0, rows, x)
        self._positions[slot_np] += 1
        return y

    def _step_graphed(self, slot_np: np.ndarray, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """`step` through model/cuda_graphs.py: one copy each way, outputs on the CPU."""
        if isinstance(x, torch.Tensor) and not x.is_cpu:
            x = x.cpu()  # a blocking copy: the rows are read on the host right after
        x = self._rows(x, slot_np.size, "step", device=torch.device("cpu"))
        positions = self._positions[slot_np]
        if positions.max() >= MAX_POSITION:
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        y, finite, bucket = self._graphs.run(slot_np, positions, x)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise NonFiniteOutputError(
                f"the outputs of streams {bad} would not be finite; the step was refused", bad
            )
        self._graphs.commit(bucket)
        self._positions[slot_np] += 1
        return y

    def _nonfinite_ring_rows(self, slot_np: np.ndarray) -> list[int]:
        """Streams whose ring rows of this step hold NaN or Inf (a value a ReLU hid from the
        outputs would poison later steps): checked only without an overflow-safe bound."""
        writes = torch.from_numpy(self._ring_rows(slot_np)[0]).to(self.device)  # (layers, N)
        finite = torch.ones(slot_np.size, dtype=torch.bool, device=self.device)
        for layer, rows in zip(self._layers, writes, strict=True):
            finite &= torch.isfinite(layer.ring[rows]).all(dim=1)
        return torch.nonzero(~finite).flatten().tolist()

    def _step_torch(self, slot_np: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            writes, taps = map(torch.from_numpy, self._ring_rows(slot_np, per_block=True))
        else:
            writes, taps = self._device_ring_rows(slot_np, per_block=True)
        return step_torch(self._step_plan, self._embed(x), writes.unbind(0), taps.unbind(0))

    def _step_numpy(self, slot_np: np.ndarray, x: np.ndarray) -> np.ndarray:
        writes, taps = self._ring_rows(slot_np)
        h = self._embedding_np[x] if self._embedding is not None else x
        h = step_numpy(self._numpy_plan, h, writes, taps)
        if self._head is not None:
            h = h @ self._head_np[0]
            h += self._head_np[1]
        return h

    @torch.inference_mode()
    def advance(
        self,
        slots: Sequence[int] | np.ndarray,
        x: torch.Tensor | np.ndarray,
        lengths: Sequence[int] | np.ndarray,
    ) -> torch.Tensor:
        """Advance N distinct streams by lengths[i] >= 1 timesteps each, in one batched call.

        x (sum(lengths), in_channels) holds stream 0's rows oldest first, then stream 1's, ...;
        returns y (sum(lengths), out) in the same order. Costs k tap rows per row and layer
        (model/ragged.py), so a few rows cost a few rows' worth, never the receptive field; for
        one long chunk, `push` (a conv over the window) is cheaper.
        """
        slot_np = self._slot_array(slots)
        counts = np.asarray(lengths)
        if counts.shape != slot_np.shape or counts.dtype.kind not in "iu" or (counts < 1).any():
            raise ValueError(f"lengths must be {slot_np.size} integers >= 1, got {lengths!r}")
        counts = counts.astype(np.int64, copy=False)
        if counts.sum() > self.max_advance_rows:
            raise ValueError(
                f"advance: {int(counts.sum())} rows in one call, more than max_advance_rows "
                f"({self.max_advance_rows}); split the call, or push long chunks"
            )
        total = int(counts.sum())
        if (
            total <= self.fused_advance_rows
            and self.overflow_safe
            and self._embedding is None
            and self.config.output_activation == "none"
        ):
            return self._advance_fused(slot_np, counts, self._host_rows(x, total, "advance"))
        x = self._rows(x, total, "advance")
        if (self._positions[slot_np] > MAX_POSITION - counts).any():
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        plan = ragged_plan(  # one set of indices per block: its two convs share them
            slot_np,
            self._positions[slot_np],
            counts,
            self._tap_offsets_np[::2],
            self._tap_lengths_np[::2],
            self._scratch_at_np[::2],
            self.history_len,
            self.device,
        )
        h, writes = ragged_forward(plan, self._step_plan, self._scratch_at[::2], self._embed(x))
        y = self._finish(h)
        bad_rows = _nonfinite_rows(y)
        if not bad_rows and not self.overflow_safe:
            per_conv = [rows for rows in plan.kept for _ in range(2)]  # a block's, per conv
            bad_rows = _nonfinite_written(writes, per_conv)
        if bad_rows:
            streams = sorted(set(np.searchsorted(np.cumsum(counts), bad_rows, side="right")))
            raise NonFiniteOutputError(
                f"the outputs of streams {streams} would not be finite; nothing was applied",
                [int(i) for i in streams],
            )
        for ring, rows, values in writes:
            ring.index_copy_(0, rows, values)
        if self.history_len:
            self._history.index_copy_(0, plan.history_at, x[plan.history_kept])
        self._positions[slot_np] += counts
        return y

    def _advance_fused(
        self, slot_np: np.ndarray, counts: np.ndarray, x: np.ndarray
    ) -> torch.Tensor:
        """A ragged advance of a few rows through the fused step kernel, as that many rows of
        one step: each stream's rows in time order, at consecutive positions. A conv's row t
        is written into its ring before any later row of the same call reads it as a tap, so
        the rows of one stream may share a call, layer by layer.

        Unlike a one-row step, its ring writes overwrite taps that a refused call would still
        need, so it is used only where the inputs' bound rules out any overflow
        (`overflow_safe`): finite inputs within `max_input_abs`, checked first, cannot give a
        non-finite output, and the call cannot be refused after it has begun.
        """
        positions = self._positions[slot_np]
        if (positions > MAX_POSITION - counts).any():
            raise ValueError(f"a stream would pass the largest position, {MAX_POSITION}")
        row_slots = np.repeat(slot_np, counts)
        firsts = np.cumsum(counts) - counts  # each stream's first row in x
        row_positions = np.repeat(positions - firsts, counts) + np.arange(len(row_slots))
        y_np, finite = fused_step.fused_step(
            self._fused_plan,
            row_slots,
            row_positions,
            x,
            (self._history_np, self.history_len, self._positions),
        )
        if not finite:  # cannot happen below the bound; the streams' rings are not trusted now
            raise RuntimeError(
                f"non-finite values in a fused advance of streams {slot_np.tolist()} despite "
                "inputs within max_input_abs"
            )
        return torch.from_numpy(y_np)

    @torch.inference_mode()
    def push(self, slot: int, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Advance one stream by a chunk: x (T, in_channels) -> y (T, out), as one batch conv."""
        self._check_slot(slot)
        x = self._rows(x, None, "push")
        steps = x.shape[0]
        self._check_advance(np.array([slot]), steps)
        t0 = int(self._positions[slot])
        # Every ring write waits until all layers have computed: a failure half-way (e.g. out
        # of memory on a long chunk) leaves the stream exactly as it was.
        writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if self.history_len:
            kept = min(steps, self.history_len)
            when = np.arange(t0 + steps - kept, t0 + steps) % self.history_len
            rows = torch.from_numpy(when + slot * self.history_len).to(self.device)
            writes.append((self._history, rows, x[steps - kept :]))
        h = self._embed(x).T  # (C, T)

        def conv(layer: _CausalLayer, inp: torch.Tensor) -> torch.Tensor:  # (C_in, T)
            base = slot * layer.ring_len
            past = layer.ring[base + torch.remainder(t0 + layer.past_offsets, layer.ring_len)]
            seq = torch.cat([past.T, inp], dim=1)  # (C_in, L - 1 + T), oldest first
            # Keep the L - 1 newest rows; the ring's remaining row is the next step's to write.
            newest = seq[:, seq.shape[1] - layer.past_offsets.numel() :].T
            when = torch.remainder(t0 + steps + layer.past_offsets, layer.ring_len)
            writes.append((layer.ring, base + when, newest))
            return F.conv1d(seq[None], layer.conv_weight, layer.bias, dilation=layer.dilation)[
                0
            ].relu_()  # (C_out, T)

        for block in self._blocks:
            out = conv(block.conv2, conv(block.conv1, h))
            if block.downsample is None:
                h = out.add_(h).relu_()
            else:
                res = torch.addmm(block.downsample[1], h.T, block.downsample[0]).T
                h = out.add_(res).relu_()
        y = self._finish(h.T.contiguous())
        bad = _nonfinite_rows(y)
        if not bad and not self.overflow_safe and not all(_all_finite(v) for _, _, v in writes):
            bad = list(range(steps))  # a hidden Inf in the state: refuse the whole chunk
        if bad:
            raise NonFiniteOutputError(
                f"the outputs of rows {bad[:10]} would not be finite; the push was refused", bad
            )
        for ring, rows, values in writes:
            ring.index_copy_(0, rows, values.contiguous())
        self._positions[slot] += steps
        return y

    # ----- state transfer --------------------------------------------------------------------

    @torch.no_grad()
    def export_state(self, slot: int) -> dict:
        """A self-contained copy of one stream's state (CPU tensors plus its position)."""
        self._check_slot(slot)
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "position": int(self._positions[slot]),
            "rings": [
                layer.ring[slot * layer.ring_len : (slot + 1) * layer.ring_len].cpu().clone()
                for layer in self._layers
            ],
            "history": self._history[slot * self.history_len : (slot + 1) * self.history_len]
            .cpu()
            .clone(),
        }

    @torch.no_grad()
    def import_state(self, state: dict) -> int:
        """Open a slot holding an exported state; refuses a state of another model."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise StateMismatchError(f"not a stream state of format {STATE_FORMAT!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise StateMismatchError("this state was exported from a different model")
        rings, position = state.get("rings"), state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise StateMismatchError(f"invalid position {position!r}")
        if not isinstance(rings, (list, tuple)) or len(rings) != len(self._layers):
            raise StateMismatchError(f"expected {len(self._layers)} ring buffers")
        for ring, layer in zip(rings, self._layers, strict=True):
            expected = (layer.ring_len, layer.ring.shape[1])
            if not isinstance(ring, torch.Tensor) or tuple(ring.shape) != expected:
                raise StateMismatchError(f"ring buffer shape differs from {expected}")
            if not ring.is_floating_point():
                raise StateMismatchError("ring buffers must be floating point")
        history = state.get("history")
        expected = tuple(self._history[: self.history_len].shape)
        if not isinstance(history, torch.Tensor) or tuple(history.shape) != expected:
            raise StateMismatchError(f"input history shape differs from {expected}")
        slot = self.open(position)
        for ring, layer in zip(rings, self._layers, strict=True):
            layer.ring[slot * layer.ring_len : (slot + 1) * layer.ring_len].copy_(ring)
        self._history[slot * self.history_len : (slot + 1) * self.history_len].copy_(history)
        return slot


def _fingerprint(net: TCN) -> str:
    """Identifies a model by config and effective weights, so states stay with their model."""
    digest = hashlib.sha256(repr(sorted(net.config.to_dict().items())).encode())
    with torch.no_grad():
        tensors = [net.embedding.weight] if net.embedding is not None else []
        for block in net.blocks:
            tensors += [block.conv1.weight, block.conv1.bias, block.conv2.weight, block.conv2.bias]
            if block.downsample is not None:
                tensors += [block.downsample.weight, block.downsample.bias]
        if net.head is not None:
            tensors += [net.head.weight, net.head.bias]
        for t in tensors:
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


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
