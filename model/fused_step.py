"""The compiled CPU kernels: the fused step, and the ring gathers of the "blas" step.

The fused step is one compiled call that advances a few streams through every layer of the TCN.

A step of one stream multiplies about 1.7 MB of weights (R1) by a few thousand inputs; what a
chain of torch or numpy ops pays on top is dispatch, a few microseconds for each of ~100 ops.
Here one numba-compiled function does the whole step, per causal conv: write time t's row into
the ring, gather the k dilated taps into a contiguous row, one dot product per output channel
(bias and ReLU folded in), then the residual and its ReLU. Only the weights are read from
memory, once per step for all N streams (the output-channel loop is outermost).

numba installs as a wheel (its LLVM comes inside llvmlite) and compiles at run time with no C
compiler; the functions compile on first use, about a second per dtype, once per process.
Without numba, `AVAILABLE` is False and `StreamPool` falls back to the numpy and torch kernels.

`write_and_gather` is the fused step's memory half on its own: per conv, the ring write and
the gather of the k taps, the rows of a later stream prefetched meanwhile (`prefetch`, an LLVM
intrinsic). The "blas" step (model/step_kernels.py) of many streams calls it and leaves the
matmuls to torch.

Numerics: the dots are compiled with reassociation allowed, so they sum in vectorised partial
sums rather than left to right: a different rounding of the same float32 sums (about 1e-7
relative), never an approximation. NaN and Inf propagate as in torch (no fast-math "no NaN"
assumption, and the ReLU keeps NaN), so the pool's non-finite checks still see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.activations import ELU_ALPHA, KERAS_LEAKY_SLOPE, LEAKY_SLOPE, SELU_ALPHA, SELU_SCALE

try:  # an optional accelerator: everything works without it, only slower for small N
    import numba
    from numba.typed import List as TypedList
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None
    TypedList = None

AVAILABLE = numba is not None

# Largest per-layer product (rows x k*C_in x C_out) a step of a wide model (largest layer above
# FUSED_NARROW_MACS) runs fused under "auto"; above it the "blas" kernel wins (compiled gathers,
# torch's GEMM). R1's layers are 28,672 MACs a row, so N <= 18 runs fused. Measured on one core,
# R1, per-stream time fused / blas: 0.69 at N = 8, 0.94 at 16, 1.13 at 24, 1.24 at 32.
FUSED_MAX_MACS = 520_000

# The same bound for narrow models: 151 rows for the built-in model (4,608 MACs a row), though
# per stream the fused step alone takes 0.97x "blas"'s time at 32 rows, 1.07x at 64, 1.16x at
# 128 and 1.26x at 151. The fused kernel keeps the GIL released for the whole step, where
# "blas" takes it back between its ~40 calls, and in the service the event loop wants it all
# the time (docs/step_engine.md has the service A/B).
FUSED_NARROW_STEP_MACS = 700_000

# Ragged advances of wide models run fused up to this many MACs per layer in all (R1: 24 rows),
# above it through model/ragged.py: the bound the step had before "blas" (whose crossover
# lowered FUSED_MAX_MACS), kept because advances were not re-measured against it.
FUSED_ADVANCE_MAX_MACS = 700_000

# A ragged advance runs each row like a row of a step, but its rows need not share a batched
# matmul's efficiency to win: the kernel releases the GIL for the whole call, where the torch
# path takes it back between its ~100 ops, and in the service the event loop wants it all the
# time. Models whose largest layer is at most this many MACs a row send every eligible advance
# (up to max_advance_rows) through the kernel. Measured on one core: the built-in model (4,608
# MACs a row) is as fast fused as through torch at 64 to 1,000 rows (0.9-1.1x), and the
# service's 10-row WebSocket frames gave 1.3x the steps/s; R1 (28,672) is 1.8x slower fused at
# 160-256 rows, so wider models stop at FUSED_ADVANCE_MAX_MACS.
FUSED_NARROW_MACS = 8_192

# The activations' constants as globals of this module, which numba compiles in.
_LEAKY_SLOPE, _ELU_ALPHA, _SELU_ALPHA, _SELU_SCALE = LEAKY_SLOPE, ELU_ALPHA, SELU_ALPHA, SELU_SCALE
_KERAS_LEAKY_SLOPE = KERAS_LEAKY_SLOPE
# `_act`'s branches, by code; an activation added to model/config.py needs its branch here.
FUSED_ACTIVATIONS = ("relu", "tanh", "leaky_relu", "elu", "gelu", "selu", "sigmoid",
                     "keras_leaky_relu")  # fmt: skip
_SQRT_HALF = math.sqrt(0.5)

# Reassociation (vectorised sums) and contraction (FMA) only: no "nnan"/"ninf", see above.
_FASTMATH = {"reassoc", "contract"}


# How many streams ahead `write_and_gather` asks for ring rows. R1, N = 256, "blas" step, one
# run: none 2.78 ms, 1 or 2 ahead 2.56, 4 2.60, 8 2.64, 12 2.68 (docs/step_engine.md).
PREFETCH_AHEAD = 2


def _jit(fn: Any) -> Any:
    if numba is None:
        return fn
    return numba.njit(nogil=True, fastmath=_FASTMATH, cache=False)(fn)


try:  # numba's extension API (public, but `cgutils` sits under numba.core)
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba absent, or an API that moved: no prefetch
    intrinsic = None

if intrinsic is not None:

    @intrinsic
    def prefetch(typingctx, array, row, col):
        """Start loading the cache line of array[row, col] (x86: prefetcht0) and go on: a hint
        with no effect on results, so that a stream's ring rows, which a step of many streams
        finds in L3 or DRAM, are on their way while the previous stream's are copied."""

        def codegen(context, builder, signature, args):
            view = context.make_array(signature.args[0])(context, builder, args[0])
            at = [
                context.cast(builder, v, t, types.intp)
                for v, t in zip(args[1:], signature.args[1:], strict=True)
            ]
            ptr = cgutils.get_item_pointer(context, builder, signature.args[0], view, at)
            byte_ptr = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            # Unsuffixed: LLVM renames it to its own mangling (typed or opaque pointers).
            fn = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                "llvm.prefetch",
            )
            # read, highest locality, data cache
            builder.call(fn, [builder.bitcast(ptr, byte_ptr), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(array, row, col), codegen

else:  # pragma: no cover - a no-op hint: the kernels run the same without it

    @_jit
    def prefetch(array: Any, row: int, col: int) -> None:
        pass


@_jit
def prefetch_taps(ring, base, now, ring_len, dilation, k, c):
    """Ask for every cache line of one stream's k tap rows, times now, now - d, ...: ring rows
    `base + (now - j*d) % L`, c values each. A hint, without effect on any result."""
    per_line = max(1, 64 // ring.itemsize)  # values in a 64-byte cache line
    for j in range(k):
        row = now - j * dilation
        if row < 0:
            row += ring_len
        for q in range(0, c, per_line):
            prefetch(ring, base + row, q)
        prefetch(ring, base + row, c - 1)  # the last line, where a row does not start on one


@_jit
def write_and_gather(ring, ring_len, dilation, k, slots, pos, inp, c, out):
    """The memory half of one causal conv for n streams at positions `pos`: write each
    stream's input (the first c columns of inp[s]) into its ring row of time t, and lay its k
    taps (times t - j*d, oldest first) side by side in the first k * c columns of out[s].
    Returns False when a value written into the ring is not finite. Unchecked (compiled code
    does no bounds checks): the caller sizes inp (n, >= c), out (n, >= k * c) and the slots.

    The fused step calls it per conv; the "blas" step (whose matmuls run in torch) calls it
    alone, in place of an index_copy_ and an embedding: R1 at N = 256, 1.0 ms against their
    1.5 ms (docs/step_engine.md). While one stream's rows are copied, the rows of the stream
    PREFETCH_AHEAD places on are already asked for.
    """
    finite = True
    n = slots.shape[0]
    for s in range(n):
        ahead = s + PREFETCH_AHEAD
        if ahead < n:
            later = slots[ahead] * ring_len
            prefetch_taps(ring, later, pos[ahead] % ring_len, ring_len, dilation, k, c)
        base = slots[s] * ring_len
        now = pos[s] % ring_len
        for q in range(c):
            v = inp[s, q]
            ring[base + now, q] = v
            out[s, (k - 1) * c + q] = v
            finite &= np.isfinite(v)
        for j in range(k - 1):  # tap j is time t - (k - 1 - j) * d
            src = now - (k - 1 - j) * dilation
            if src < 0:
                src += ring_len
            for q in range(c):
                out[s, j * c + q] = ring[base + src, q]
    return finite


@_jit
def _act(v, code, zero):
    """The block activation `code` (model/activations.py's order) of one value, in v's dtype;
    NaN stays NaN. The constants are model/activations.py's (numba reads module globals as
    compile-time constants)."""
    if code < 0:  # none: the conv before a gate
        return v
    if code == 0:  # relu
        return v if not v < zero else zero
    if code == 1:  # tanh
        return math.tanh(v)
    if code == 2:  # leaky_relu
        return v if not v < zero else v * _LEAKY_SLOPE
    if code == 3:  # elu
        return v if not v < zero else _ELU_ALPHA * math.expm1(v)
    if code == 4:  # gelu, exact
        return 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))
    if code == 5:  # selu
        return _SELU_SCALE * (v if not v < zero else _SELU_ALPHA * math.expm1(v))
    if code == 6:  # sigmoid
        return 1.0 / (1.0 + math.exp(-v))
    if code == 7:  # keras_leaky_relu
        return v if not v < zero else v * _KERAS_LEAKY_SLOPE
    return math.nan  # a code with no branch: refused as a non-finite output, never guessed


@_jit
def _conv(ring, weight_t, bias, ring_len, dilation, k, slots, pos, inp, c_in, out, taps, zero, act):
    """One dilated causal conv for n streams: out[:n, :C_out] = act(taps @ W + b).

    ring (slots * L + scratch, C_in); weight_t (C_out, k * C_in), taps oldest first; inp and
    out are (max_rows, C_max) scratch, the first c_in / C_out columns in use. Returns False
    when a value written into the ring is not finite.
    """
    n = slots.shape[0]
    finite = write_and_gather(ring, ring_len, dilation, k, slots, pos, inp, c_in, taps)
    width = k * c_in
    for o in range(weight_t.shape[0]):  # each weight row is read once for all n streams
        s = 0
        while s + 4 <= n:  # four streams at a time share each load of the weight row
            w = weight_t[o]
            t0, t1, t2, t3 = taps[s], taps[s + 1], taps[s + 2], taps[s + 3]
            a0 = a1 = a2 = a3 = bias[o]
            for i in range(width):
                v = w[i]
                a0 += v * t0[i]
                a1 += v * t1[i]
                a2 += v * t2[i]
                a3 += v * t3[i]
            if act == 0:  # ReLU that keeps NaN, in the dtype: the common case, kept tight
                out[s, o] = a0 if not a0 < zero else zero
                out[s + 1, o] = a1 if not a1 < zero else zero
                out[s + 2, o] = a2 if not a2 < zero else zero
                out[s + 3, o] = a3 if not a3 < zero else zero
            else:
                out[s, o] = _act(a0, act, zero)
                out[s + 1, o] = _act(a1, act, zero)
                out[s + 2, o] = _act(a2, act, zero)
                out[s + 3, o] = _act(a3, act, zero)
            s += 4
        while s < n:
            acc = bias[o]
            for i in range(width):
                acc += weight_t[o, i] * taps[s, i]
            if act == 0:
                out[s, o] = acc if not acc < zero else zero
            else:
                out[s, o] = _act(acc, act, zero)
            s += 1
    return finite


@_jit
def _norm_act(buf, n, width, weight, bias, act, zero, eps):
    """buf[:n, :width] layer-normed per row (nn.LayerNorm: biased variance, eps inside the
    root, then weight and bias), then the activation `act` (-1: none), in place."""
    for s in range(n):
        mean = 0.0
        for i in range(width):
            mean += buf[s, i]
        mean /= width
        var = 0.0
        for i in range(width):
            d = buf[s, i] - mean
            var += d * d
        inv = 1.0 / math.sqrt(var / width + eps)
        for i in range(width):
            buf[s, i] = _act((buf[s, i] - mean) * inv * weight[i] + bias[i], act, zero)


@_jit
def _condition(src, dst, n, width, table, slots, mix_t, act, zero):
    """dst[:n, :width] = act(src's row (times mix_t's W2a where it has one) + the row of each
    stream's slot in `table`): a conditioned block's first conv, after its norm. In place
    (src is dst) only without a mix."""
    mixed = mix_t.shape[0] > 0
    for s in range(n):
        row = slots[s]
        for o in range(width):
            if mixed:
                acc = table[row, o]
                for i in range(width):
                    acc += mix_t[o, i] * src[s, i]
            else:
                acc = src[s, o] + table[row, o]
            dst[s, o] = _act(acc, act, zero)


@_jit
def _affine(weight_t, bias, inp, c_in, out, n):
    """out[:n, :C_out] = inp[:n, :c_in] @ W + b, with weight_t (C_out, c_in)."""
    for o in range(weight_t.shape[0]):
        for s in range(n):
            acc = bias[o]
            for i in range(c_in):
                acc += weight_t[o, i] * inp[s, i]
            out[s, o] = acc


# The fused step's operands, as one typed list of 2-D arrays (`ops`) and one int64 array of
# sizes and flags (`meta`), so that a call unboxes two containers, not one per kind of operand:
# numba types each typed list argument in Python on every call (what that costs:
# docs/benchmarks/results/model_step_r1_n1_checked.txt). With B blocks, ops
# holds, in order (a "row" is a (1, C) array; (0, 0) where a block has none):
#   [0, 2B)    rings, one per conv         [2B, 4B)  weights (C_out, k * C_in), transposed
#   [4B, 6B)   biases (rows)               [6B, 8B)  per block downsample weight, bias row
#   [8B, 10B)  per block skip weight, row  [10B, 14B) per block norm1, norm2 weight and bias rows
#   [14B, 15B) condition tables            [15B, 16B) condition mixes (W2a^T)
#   16B, +1    head weight, bias row       16B+2 .. 16B+7: scratch h, a, o, r, taps, skip sum
#   16B+8      y                           16B+9: the input history (rows, C_in), or (0, C_in)
# and meta: k, activation code, gate, keras, skip connections, history length, B, then the
# 2B ring lengths, the B dilations, the B skip modes, and max_rows of scratch (positions).
_META_RING_LENS = 7


@_jit
def _run(ops, meta, slots, pos, by_slot, x, zero, norm_eps):
    """The whole step of n = len(slots) streams, into ops' y; returns False when a ring write
    or an output is not finite. Stream s is at position pos[slots[s]] (`by_slot`, a step: pos
    is the pool's positions) or pos[s] (an advance's rows). Skip modes per block: 0 none, 1
    its conv output added as it is, 2 through its 1x1 conv; with any, the sum is added to the
    last block's output and the activation taken again (pytorch-tcn's use_skip_connections).
    A conditioned block adds each stream's row of its table after the first conv and its norm
    (times the block's mix first, where the mix is not folded into the conv; `_condition`)."""
    k, act, gate, keras, use_skips, nb = meta[0], meta[1], meta[2], meta[3], meta[4], meta[6]
    at_dil = _META_RING_LENS + 2 * nb
    at_skip = at_dil + nb
    base = 16 * nb
    h, a, o, r = ops[base + 2], ops[base + 3], ops[base + 4], ops[base + 5]
    taps, sk, y = ops[base + 6], ops[base + 7], ops[base + 8]
    n, c = slots.shape[0], x.shape[1]
    rows = meta[at_skip + nb : at_skip + nb + n]  # scratch: each stream's position
    for s in range(n):
        rows[s] = pos[slots[s]] if by_slot else pos[s]
        for i in range(c):
            h[s, i] = x[s, i]
    if use_skips:
        for s in range(n):
            for i in range(sk.shape[1]):
                sk[s, i] = zero
    finite = True
    for b in range(nb):
        dilation = meta[at_dil + b]
        len1, len2 = meta[_META_RING_LENS + 2 * b], meta[_META_RING_LENS + 2 * b + 1]
        ring1, ring2 = ops[2 * b], ops[2 * b + 1]
        w1, w2 = ops[2 * nb + 2 * b], ops[2 * nb + 2 * b + 1]
        b1, b2 = ops[4 * nb + 2 * b][0], ops[4 * nb + 2 * b + 1][0]
        mid, c_out = w2.shape[1] // k, w2.shape[0]
        normed = ops[10 * nb + 4 * b].shape[0] > 0  # layer norms after both convs
        table, mix_t = ops[14 * nb + b], ops[15 * nb + b]
        if table.shape[0] > 0:  # conditioned: conv, norm, the streams' terms, then act or gate
            width = 2 * mid if gate else mid
            mixed = mix_t.shape[0] > 0
            pre = r if mixed or gate else a  # the conv's output; o is free until conv2
            finite &= _conv(
                ring1, w1, b1, len1, dilation, k, slots, rows, h, c, pre, taps, zero, -1
            )  # fmt: skip
            if normed:
                _norm_act(
                    pre, n, width, ops[10 * nb + 4 * b][0], ops[10 * nb + 4 * b + 1][0], -1, zero,
                    norm_eps,
                )  # fmt: skip
            if gate:
                post = o if mixed else r
                _condition(pre, post, n, width, table, slots, mix_t, -1, zero)
                for s in range(n):
                    for i in range(mid):
                        a[s, i] = post[s, i] / (1.0 + math.exp(-post[s, mid + i]))
            else:
                _condition(pre, a, n, width, table, slots, mix_t, act, zero)
        elif gate:  # the conv's 2 * mid outputs into r, then a = first half x sigmoid(second)
            finite &= _conv(ring1, w1, b1, len1, dilation, k, slots, rows, h, c, r, taps, zero, -1)
            if normed:
                _norm_act(
                    r, n, 2 * mid, ops[10 * nb + 4 * b][0], ops[10 * nb + 4 * b + 1][0], -1, zero,
                    norm_eps,
                )  # fmt: skip
            for s in range(n):
                for i in range(mid):
                    a[s, i] = r[s, i] / (1.0 + math.exp(-r[s, mid + i]))
        else:
            finite &= _conv(
                ring1, w1, b1, len1, dilation, k, slots, rows, h, c, a, taps, zero,
                -1 if normed else act,
            )  # fmt: skip
            if normed:
                _norm_act(
                    a, n, mid, ops[10 * nb + 4 * b][0], ops[10 * nb + 4 * b + 1][0], act, zero,
                    norm_eps,
                )  # fmt: skip
        finite &= _conv(
            ring2, w2, b2, len2, dilation, k, slots, rows, a, mid, o, taps, zero,
            -1 if normed else act,
        )  # fmt: skip
        if normed:
            _norm_act(
                o, n, c_out, ops[10 * nb + 4 * b + 2][0], ops[10 * nb + 4 * b + 3][0], act, zero,
                norm_eps,
            )  # fmt: skip
        if keras:  # keras-tcn's Act_Conv_Blocks: the activation once more
            for s in range(n):
                for i in range(c_out):
                    o[s, i] = _act(o[s, i], act, zero)
        mode = meta[at_skip + b] if use_skips else 0
        if mode == 1:
            for s in range(n):
                for i in range(c_out):
                    sk[s, i] += o[s, i]
        elif mode == 2:  # r is free until the residual below
            skip_w = ops[8 * nb + 2 * b]
            _affine(skip_w, ops[8 * nb + 2 * b + 1][0], o, c_out, r, n)
            for s in range(n):
                for i in range(skip_w.shape[0]):
                    sk[s, i] += r[s, i]
        residual = h
        if ops[6 * nb + 2 * b].shape[0] > 0:  # a 1x1 conv where the width changes
            _affine(ops[6 * nb + 2 * b], ops[6 * nb + 2 * b + 1][0], h, c, r, n)
            residual = r
        # Branches on `act` as statements, never one typed expression: mixing the dtype's ReLU
        # with `_act`'s float64 in one expression costs the ReLU path its vectorised stores.
        if act == 0:
            for s in range(n):
                for i in range(c_out):
                    v = o[s, i] + residual[s, i]
                    h[s, i] = v if not v < zero else zero
        else:
            for s in range(n):
                for i in range(c_out):
                    h[s, i] = _act(o[s, i] + residual[s, i], act, zero)
        c = c_out
    if use_skips:
        for s in range(n):
            for i in range(c):
                h[s, i] = sk[s, i] if keras else _act(h[s, i] + sk[s, i], act, zero)
    head = ops[base]
    if head.shape[0] > 0:
        _affine(head, ops[base + 1][0], h, c, y, n)
    else:
        for s in range(n):
            for i in range(c):
                y[s, i] = h[s, i]
    for s in range(n):
        for i in range(y.shape[1]):
            finite &= np.isfinite(y[s, i])
    return finite


@_jit
def _commit(ops, meta, slots, rows_at, by_slot, x, positions):
    """After a finite step: x into each stream's input history, and its position on by one."""
    history, history_len = ops[16 * meta[6] + 9], meta[5]
    for s in range(slots.shape[0]):
        if history_len > 0:
            t = rows_at[slots[s]] if by_slot else rows_at[s]
            at = slots[s] * history_len + t % history_len
            for i in range(x.shape[1]):
                history[at, i] = x[s, i]
        positions[slots[s]] += 1


@_jit
def _step(ops, meta, slots, pos, x, zero, norm_eps, commit, positions):
    """`fused_step`'s kernel: the step at positions pos[s]; with `commit`, a finite step also
    records x in the history and moves `positions` on."""
    finite = _run(ops, meta, slots, pos, False, x, zero, norm_eps)
    if finite and commit:
        _commit(ops, meta, slots, pos, False, x, positions)
    return finite


# `_step_checked`'s outcomes; every refusal but NONFINITE is found before anything is written.
STEP_OK, STEP_NONFINITE, STEP_BAD_SLOT, STEP_BAD_INPUT, STEP_LAST_POSITION = 0, 1, 2, 3, 4


@_jit
def _step_checked(ops, meta, slots, positions, is_open, x, limit, last_position, zero, norm_eps):
    """A pool's step with its checks inside the kernel: every slot open and named once, every
    |input| <= limit (NaN fails), no position at `last_position`; then the step, and when it is
    finite, the commit. Returns one of the STEP_ codes."""
    n, capacity = slots.shape[0], is_open.shape[0]
    for s in range(n):
        slot = slots[s]
        if slot < 0 or slot >= capacity or not is_open[slot]:
            return STEP_BAD_SLOT
        for q in range(s):
            if slots[q] == slot:
                return STEP_BAD_SLOT
    for s in range(n):
        for i in range(x.shape[1]):
            if not abs(x[s, i]) <= limit:
                return STEP_BAD_INPUT
    for s in range(n):
        if positions[slots[s]] >= last_position:
            return STEP_LAST_POSITION
    if not _run(ops, meta, slots, positions, True, x, zero, norm_eps):
        return STEP_NONFINITE
    _commit(ops, meta, slots, positions, True, x, positions)
    return STEP_OK


@dataclass(frozen=True)
class FusedPlan:
    """Everything the compiled step reads: `ops` and `meta` (laid out as above), numpy views of
    the pool's CPU tensors where the pool owns them (rings, condition tables, history)."""

    ops: Any  # typed list of 2-D arrays of the pool's dtype
    meta: np.ndarray  # int64
    n_blocks: int
    max_rows: int
    zero: Any  # 0 in the pool's dtype, so the compiled code never widens to float64
    norm_eps: float  # the layer norms' epsilon
    no_positions: np.ndarray  # (0,) int64: stands in for the positions when not committing
    # The outputs of the last step, (max_rows, output width): the array at ops[16B + 8], held
    # here too because reading an item of a typed list from Python is a compiled call.
    y: np.ndarray

    @property
    def cond_tables(self) -> list[np.ndarray]:
        return [self.ops[14 * self.n_blocks + b] for b in range(self.n_blocks)]


def fused_plan(
    layers: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]],  # (ring, step_w, bias, L)
    dilations: list[int],
    kernel_size: int,
    downsample: list[tuple[np.ndarray, np.ndarray] | None],  # per block (C_in, C_out), (C_out,)
    head: tuple[np.ndarray, np.ndarray] | None,  # (C, out), (out,)
    in_width: int,
    max_rows: int,
    act: int = 0,
    skips: tuple | None = None,  # StreamPool._skips as numpy: per block but the last
    gate: bool = False,
    norms: list | None = None,  # per block (norm1, norm2), each (weight, bias) or None
    keras: bool = False,
    conds: list | None = None,  # per block (table, mix (W, W) or None) or None (conditioning.py)
    history: tuple[np.ndarray, int] | None = None,  # the pool's (slots * len, C_in), len
) -> FusedPlan:
    """Lay out a pool's operands for `fused_step` (weights transposed once, at load)."""
    if not AVAILABLE:
        raise RuntimeError("the fused step kernel needs numba (pip install numba)")
    dtype = layers[0][0].dtype
    empty = np.zeros((0, 0), dtype=dtype)
    n_blocks = len(dilations)
    widths = [in_width] + [w.shape[1] for _, w, _, _ in layers]
    c_max = max(widths)

    def transposed(pair: tuple[np.ndarray, np.ndarray] | None) -> list[np.ndarray]:
        """A (C_in, C_out) weight and its bias as the kernel reads them, or two empties."""
        if pair is None:
            return [empty, empty]
        return [np.ascontiguousarray(pair[0].T), pair[1].reshape(1, -1).copy()]

    def as_row(v: np.ndarray | None) -> np.ndarray:
        return empty if v is None else np.ascontiguousarray(v.reshape(1, -1))

    modes, skip_w = [], []
    for pair in skips or ():
        modes.append(1 if pair is None else 2)
        skip_w += transposed(pair)
    if skips is not None and len(modes) < n_blocks:
        modes.append(0)  # the last block's output is the sum's other term
    skip_w += [empty, empty] * (n_blocks - len(skip_w) // 2)
    norm_rows = [
        as_row(part)
        for pair in (norms or [(None, None)] * n_blocks)
        for norm in pair
        for part in (norm[:2] if norm is not None else (None, None))
    ]
    out_width = head[0].shape[1] if head is not None else widths[-1]
    bufs = [np.zeros((max_rows, c_max), dtype=dtype) for _ in range(4)]
    bufs.append(np.zeros((max_rows, kernel_size * c_max), dtype=dtype))
    bufs.append(np.zeros((max_rows, c_max), dtype=dtype))  # the skip connections' sum
    conds = conds or [None] * n_blocks
    y = np.zeros((max_rows, out_width), dtype=dtype)
    arrays = (
        [ring for ring, _, _, _ in layers]
        + [np.ascontiguousarray(w.T) for _, w, _, _ in layers]
        + [b.reshape(1, -1) for _, _, b, _ in layers]
        + [a for pair in downsample for a in transposed(pair)]
        + skip_w
        + norm_rows
        # views of the pool's tables (open() writes them), so one plan serves every stream
        + [empty if c is None else c[0] for c in conds]
        + [empty if c is None or c[1] is None else np.ascontiguousarray(c[1].T) for c in conds]
        + transposed(head)
        + bufs
        + [y]
        + [history[0] if history is not None else np.zeros((0, in_width), dtype=dtype)]
    )
    assert len(arrays) == 16 * n_blocks + 10, len(arrays)
    ops = TypedList()
    for arr in arrays:
        assert arr.dtype == dtype and arr.ndim == 2 and arr.flags.c_contiguous, arr.shape
        ops.append(arr)
    meta = np.array(
        [kernel_size, act, gate, keras, skips is not None, history[1] if history else 0, n_blocks]
        + [length for _, _, _, length in layers]
        + list(dilations)
        + (modes or [0] * n_blocks)
        + [0] * max_rows,
        dtype=np.int64,
    )
    return FusedPlan(
        ops=ops,
        meta=meta,
        n_blocks=n_blocks,
        max_rows=max_rows,
        zero=dtype.type(0),
        norm_eps=next((float(n[2]) for pair in norms or () for n in pair if n is not None), 1e-5),
        no_positions=np.zeros(0, dtype=np.int64),
        y=y,
    )


def fused_step(
    plan: FusedPlan,
    slots: np.ndarray,
    positions: np.ndarray,
    x: np.ndarray,
    commit: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """One step of n <= max_rows rows at positions[s]: x (n, C_in) -> (y (n, out), finite),
    y a fresh array. The rows of one stream may share a call, in time order (an advance).

    Writes time t's rows into the rings (harmless until the positions move on); `finite` is
    False when an output or a ring write is NaN or Inf. `commit`, the pool's positions: when
    the step is finite, x goes into each stream's input history and its position moves on,
    inside the same call.
    """
    if not 0 < x.shape[0] <= plan.max_rows or slots.shape != (x.shape[0],):
        # the compiled code does not check bounds
        raise ValueError(f"the fused step takes 1 to {plan.max_rows} rows, got {x.shape[0]}")
    # One array layout per argument (writable, C-contiguous), so each dtype compiles once.
    slots, positions, x = (
        a if a.flags.c_contiguous and a.flags.writeable else a.copy() for a in (slots, positions, x)
    )
    finite = _step(
        plan.ops,
        plan.meta,
        slots,
        positions,
        x,
        plan.zero,
        plan.norm_eps,
        commit is not None,
        commit if commit is not None else plan.no_positions,
    )
    return plan.y[: x.shape[0]].copy(), bool(finite)


def step_checked(
    plan: FusedPlan,
    slots: np.ndarray,
    positions: np.ndarray,
    is_open: np.ndarray,
    x: np.ndarray,
    limit: float,
    last_position: int,
) -> int:
    """A pool's whole step in one call (`_step_checked`): slots (n,) int64 and x (n, C_in),
    both C-contiguous and writable (the caller checks the layout; the kernel the values).
    Returns a STEP_ code; the outputs of STEP_OK and STEP_NONFINITE are in plan.y[:n]."""
    return _step_checked(
        plan.ops, plan.meta, slots, positions, is_open, x, limit, last_position, plan.zero,
        plan.norm_eps,
    )  # fmt: skip
