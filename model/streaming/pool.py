"""StreamPool: many streams of one TCN advanced together from preallocated ring buffers.

The class ties the pool's parts together and builds them (`__init__`); each part lives in its
own file of this package, as a mixin StreamPool inherits:

- slots.py (`SlotBookkeeping`): open, close, reset, positions, the free list;
- validation.py (`InputValidation`): input checks and non-finite refusals;
- planning.py (`KernelPlanning`): which kernel runs a step of how many streams;
- rings.py (`RingBuffers`): the ring buffers' layout, building them, their row arithmetic;
- steps.py (`StepPaths`): step, advance and push, which update the rings;
- state.py (`StateTransfer`): export and import of one stream's state;
- conditioning.py (`StreamEmbeddings`): a conditioned model's per-stream embeddings.
"""

from __future__ import annotations

import numpy as np
import torch

from model.activations import activation
from model.cuda_graphs import GraphedStep
from model.numeric_range import safe_input_bound
from model.streaming.conditioning import StreamEmbeddings
from model.streaming.planning import STEP_KERNELS, KernelPlanning
from model.streaming.rings import RingBuffers
from model.streaming.slots import SlotBookkeeping
from model.streaming.state import StateTransfer, _fingerprint
from model.streaming.steps import StepPaths
from model.streaming.validation import InputValidation
from model.tcn import TCN


class StreamPool(
    SlotBookkeeping,
    InputValidation,
    KernelPlanning,
    RingBuffers,
    StepPaths,
    StateTransfer,
    StreamEmbeddings,
):
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
        # Every kernel's activation, and the gate after each block's first conv if any
        self._act = activation(net.config.activation, net.config.gate, net.config.keras_tcn)
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
        # A conditioned model's stream embeddings are held to the same bound (open refuses
        # larger values), which model/numeric_range.py takes for them too.
        self.max_embedding_abs = bound
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
