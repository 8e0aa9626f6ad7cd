"""The activations a TemporalBlock may use, written once for every kernel that computes one.

The names and constants are pytorch-tcn 1.2.3's (`nn.ReLU()`, `nn.LeakyReLU()` with its default
slope, `nn.ELU()`, `nn.GELU()` exact, `nn.SELU()`, ...), which are also keras-tcn's (Keras'
`relu`, `tanh`, `elu`, `gelu` exact, `selu`, `sigmoid`). Each kernel takes an `Activation`:

- torch kernels (`TCN.forward`, step_torch, step_blas, the ragged advance, the chunked push,
  CUDA graphs) call `inplace` / `addmm`, torch's own functions;
- step_numpy calls `numpy_inplace` (numpy for ReLU, torch on a zero-copy view otherwise, so
  every host kernel rounds as torch does);
- the compiled fused step (model/fused_step.py) branches on `code` inside its loops.

`bound` is what model/numeric_range.py needs: |f(v)| <= gain * |v| + const for every v.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.config import ACTIVATIONS

LEAKY_SLOPE = 0.01  # nn.LeakyReLU()'s default negative slope
KERAS_LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu's (Keras 3), keras-tcn's "leaky_relu"
ELU_ALPHA = 1.0
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
# |f(v)| <= gain * |v| + const: relu, leaky_relu and gelu never grow a value; tanh and sigmoid
# stay within 1; elu is v above 0 and within alpha below; selu is scale * elu(alpha).
_BOUNDS = {
    "relu": (1.0, 0.0),
    "tanh": (0.0, 1.0),
    "leaky_relu": (1.0, 0.0),
    "elu": (1.0, ELU_ALPHA),
    "gelu": (1.0, 0.0),
    "selu": (SELU_SCALE, SELU_SCALE * SELU_ALPHA),
    "sigmoid": (0.0, 1.0),
    "keras_leaky_relu": (1.0, 0.0),
}

# addmm with the ReLU fused in (cuBLASLt epilogue on CUDA, one dispatch on CPU).
_addmm_relu = getattr(torch, "_addmm_activation", None) or (
    lambda bias, a, w: torch.addmm(bias, a, w).relu_()
)


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # the fused step's branch (model/fused_step.py `_act`)
    fn: Callable[[torch.Tensor], torch.Tensor]  # out of place (training: autograd-safe)
    inplace: Callable[[torch.Tensor], torch.Tensor]  # the kernels' (inference)
    bound: tuple[float, float]
    # pytorch-tcn's use_gate: each block's first conv has twice the width, and a GLU (its first
    # half times the sigmoid of its second) takes the activation's place after it.
    gated: bool = False
    # keras-tcn's block: the second conv's output goes through the activation twice (its
    # Act_Conv1D_1, then Act_Conv_Blocks), and skip connections sum every block's second-conv
    # output, the last block's included, with no activation after (model/tcn.py).
    keras: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def addmm(
        self, bias: torch.Tensor, a: torch.Tensor, w: torch.Tensor, norm: Norm = None
    ) -> torch.Tensor:
        """act(bias + a @ w) in a fresh tensor (layer-normed first when `norm` is given)."""
        if norm is None and self.code == 0:
            return _addmm_relu(bias, a, w)
        return self.inplace(layer_norm(torch.addmm(bias, a, w), norm, -1))

    def second(
        self, bias: torch.Tensor, a: torch.Tensor, w: torch.Tensor, norm: Norm = None
    ) -> torch.Tensor:
        """A block's second conv as one matmul: `addmm`, activated again for keras-tcn."""
        y = self.addmm(bias, a, w, norm)
        return self.inplace(y) if self.keras else y

    def first(
        self,
        bias: torch.Tensor,
        a: torch.Tensor,
        w: torch.Tensor,
        norm: Norm = None,
        cond: Conditioning = None,
    ) -> torch.Tensor:
        """A block's first conv as one matmul: (rows, 2C) gated to (rows, C), or `addmm`; with
        `cond`, each row's stream embedding term added before the gate or activation."""
        if cond is None and not self.gated:
            return self.addmm(bias, a, w, norm)
        y = layer_norm(torch.addmm(bias, a, w), norm, -1)
        if cond is not None:
            y = conditioned(y, cond, -1)
        return glu(y, dim=-1) if self.gated else self.inplace(y)

    def of(
        self,
        y: torch.Tensor,
        dim: int,
        norm: Norm = None,
        first: bool = False,
        cond: Conditioning = None,
    ):
        """A conv's computed output `y` (channels along `dim`): normed, then (a first conv's)
        conditioned and gated or activated."""
        y = layer_norm(y, norm, dim)
        if first:
            if cond is not None:
                y = conditioned(y, cond, dim)
            return glu(y, dim) if self.gated else self.inplace(y)
        y = self.inplace(y)
        return self.inplace(y) if self.keras else y

    def numpy_of(
        self, a: np.ndarray, norm: Norm = None, first: bool = False, cond: Any = None
    ) -> np.ndarray:
        """`of` for (rows, C) numpy rows, in place where it can be (`cond` as numpy arrays)."""
        if cond is not None:  # normed first, then the streams' rows added (after W2a)
            if norm is not None:
                norm = (torch.from_numpy(norm[0]), torch.from_numpy(norm[1]), norm[2])
                a = layer_norm(torch.from_numpy(a), norm, -1).numpy()
                norm = None
            if cond[1] is not None:
                a = a @ cond[1]
            a += cond[0]
        if norm is None and not (first and self.gated):
            a = self.numpy_inplace(a)
            return self.numpy_inplace(a) if self.keras and not first else a
        if norm is not None:  # numpy views of the pool's tensors
            norm = (torch.from_numpy(norm[0]), torch.from_numpy(norm[1]), norm[2])
        return self.of(torch.from_numpy(a), -1, norm, first).numpy()

    def numpy_inplace(self, a: np.ndarray) -> np.ndarray:
        if self.code == 0:
            return np.maximum(a, 0, out=a)  # keeps NaN, as torch's ReLU does
        self.inplace(torch.from_numpy(a))
        return a


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(F.gelu(x))  # exact (erf) GELU; torch has no in-place one


_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "leaky_relu": functools.partial(F.leaky_relu, negative_slope=LEAKY_SLOPE),
    "elu": functools.partial(F.elu, alpha=ELU_ALPHA),
    "gelu": F.gelu,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "keras_leaky_relu": functools.partial(F.leaky_relu, negative_slope=KERAS_LEAKY_SLOPE),
}
_INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "leaky_relu": lambda x: F.leaky_relu_(x, LEAKY_SLOPE),
    "elu": lambda x: F.elu_(x, ELU_ALPHA),
    "gelu": _gelu_,
    "selu": torch.selu_,
    "sigmoid": torch.sigmoid_,
    "keras_leaky_relu": lambda x: F.leaky_relu_(x, KERAS_LEAKY_SLOPE),
}


# A conv's layer norm (per timestep over the channels): its (weight, bias, eps), or None.
Norm = tuple[torch.Tensor, torch.Tensor, float] | None
# A conditioned block's term after its first conv (model/streaming/conditioning.py): the rows
# (rows, C) of the streams advanced, or one stream's (C,) row, and "concat"'s (C, C) matmul
# after a layer norm (None when it is folded into the conv); None for a plain model.
Conditioning = tuple[torch.Tensor, torch.Tensor | None] | None


def conditioned(y: torch.Tensor, cond: Conditioning, dim: int) -> torch.Tensor:
    """A first conv's (normed) output y with channels along `dim` (the last: one row per
    stream; 0: one stream's (C, T)) plus its embedding term, after the mix if any."""
    bias, mix = cond
    if dim in (-1, y.dim() - 1):
        return y.add_(bias) if mix is None else torch.addmm(bias, y, mix)
    column = bias[:, None]  # (C, 1): the same term at every timestep
    return y.add_(column) if mix is None else torch.addmm(column, mix.T, y)


def layer_norm(y: torch.Tensor, norm: Norm, dim: int) -> torch.Tensor:
    if norm is None:
        return y
    if dim in (-1, y.dim() - 1):
        return F.layer_norm(y, (y.shape[-1],), norm[0], norm[1], norm[2])
    return F.layer_norm(y.movedim(dim, -1), (y.shape[dim],), norm[0], norm[1], norm[2]).movedim(
        -1, dim
    )


def glu(x: torch.Tensor, dim: int) -> torch.Tensor:
    """nn.GLU: the first half of `dim` times the sigmoid of the second (|glu(a, b)| <= |a|)."""
    return F.glu(x, dim=dim)


@functools.cache
def activation(name: str, gated: bool = False, keras: bool = False) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")
    index = ACTIVATIONS.index(name)
    return Activation(name, index, _FUNCTIONS[name], _INPLACE[name], _BOUNDS[name], gated, keras)
