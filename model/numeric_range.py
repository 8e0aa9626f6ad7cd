"""The largest input magnitude a TCN can take without any intermediate value overflowing.

Finite inputs can still overflow: rows of 3.4e38 in float32 turn into Inf inside the first conv,
and an Inf that a later ReLU masks would sit in a ring buffer and poison the stream's future
outputs. Every activation f has |f(v)| <= p |v| + q (ReLU, leaky ReLU, GELU: p = 1, q = 0; tanh
and sigmoid: p = 0, q = 1; model/activations.py), so with |x| <= M each value is bounded by
g * M + c, where g and c follow from the weights' absolute row sums (the induced infinity norm),
the biases and (p, q); a conv's sum before its activation is bounded first:

    conv1:  |a|   <= p (|W1| |h| + |b1|) + q    (k taps of C_in values per output)
    conv2:  |out| <= p (|W2| |a| + |b2|) + q
    block:  |h'|  <= p (|out| + |residual|) + q (residual = h, or the 1x1 downsample of h)
    norm:   |LN(v)| <= sqrt(C - 1) |weight| + |bias| whatever v; its variance squares v, so
            |v| stays within sqrt(limit / C)
    embedding (a conditioned model: its stream embeddings e are held to |e| <= M as well):
            |c| <= |P| M + |p| is added to conv1's (normed) output, or for "concat" the 1x1
            conv gives |W2a| |a| + |W2b| |c| + |b2|
    skips:  |s|   <= sum over blocks but the last of |out_i| (|Ws_i| |out_i| + |bs_i| if 1x1)
            and the output p (|h_last| + |s|) + q
    head:   |y|   <= |Wh| |h| + |bh|

Refusing inputs above the M that keeps every bound under half the dtype's range makes overflow
impossible (the factor two covers rounding of the sums). The bound is loose (it assumes every
weight lines up with the input's sign), so for trained float32 models it sits around 1e24, far
beyond any real signal; for a range as narrow as float16's it can fall below useful inputs, and
then the caller gets None and must check outputs instead.
"""

from __future__ import annotations

import math

import torch

from model.activations import activation
from model.tcn import TCN

# Below this the bound would refuse ordinary signals: report "no bound" instead.
SMALLEST_USEFUL_BOUND = 1e4


def _norm(weight: torch.Tensor) -> float:
    """max over output channels of the sum of |w| (the induced infinity norm)."""
    w = weight.detach().double().abs()
    return float(w.reshape(w.shape[0], -1).sum(1).max())


def _bias(bias: torch.Tensor | None) -> float:
    return float(bias.detach().double().abs().max()) if bias is not None else 0.0


def _normed(bound: tuple[float, float], norm: torch.nn.LayerNorm | None) -> tuple[float, float]:
    """A layer norm's output, whatever its input: each normalised value is within
    sqrt(C - 1) of 0, then scaled by |weight| and moved by |bias|."""
    if norm is None:
        return bound
    c = norm.weight.numel()
    return 0.0, math.sqrt(max(c - 1, 1)) * _bias(norm.weight) + _bias(norm.bias)


def _conditioned(
    a_sum: tuple[float, float], block: torch.nn.Module, bounds: list[tuple[float, float]]
) -> tuple[float, float]:
    """A conditioned block's first conv output plus its embedding term, |e| <= M."""
    proj = block.embedding_projection
    term = (_norm(proj.weight), _bias(proj.bias))  # c = P e + p
    bounds.append(term)
    if block.concat_projection is not None:
        w = block.concat_projection.weight.detach()
        width = w.shape[0]
        na, nb = _norm(w[:, :width]), _norm(w[:, width:])
        term = (nb * term[0], nb * term[1] + _bias(block.concat_projection.bias))
        a_sum = (na * a_sum[0], na * a_sum[1])  # W2a a: folded into conv1 where no norm is
        bounds += [term, a_sum]
    return a_sum[0] + term[0], a_sum[1] + term[1]


@torch.no_grad()
def safe_input_bound(net: TCN, dtype: torch.dtype) -> float | None:
    """The largest |x| whose every intermediate stays under half of dtype's range, or None
    when that bound is below SMALLEST_USEFUL_BOUND. For a token model, x is the embedding row,
    so every id is safe when max |embedding| is within the bound."""
    limit = torch.finfo(dtype).max / 2
    # Each tracked value is (g, c): |value| <= g * M + c.
    bounds: list[tuple[float, float]] = []
    p, q = activation(net.config.activation).bound

    def act(value: tuple[float, float]) -> tuple[float, float]:
        return p * value[0], p * value[1] + q

    g, c = 1.0, 0.0
    skips: list[tuple[float, float]] = []  # each block's conv output bound
    for block in net.blocks:
        n1, n2 = _norm(block.conv1.weight), _norm(block.conv2.weight)
        conv1 = (n1 * g, n1 * c + _bias(block.conv1.bias))  # before its norm, if any
        a_sum = _normed(conv1, block.norm1)
        if block.embedding_projection is not None:
            a_sum = _conditioned(a_sum, block, bounds)
        a = a_sum if net.config.gate else act(a_sum)  # |glu(u, v)| = |u| sigmoid(v) <= |u|
        conv2 = (n2 * a[0], n2 * a[1] + _bias(block.conv2.bias))
        out_sum = _normed(conv2, block.norm2)
        out = act(out_sum)
        if net.config.keras_tcn:  # activated twice
            out = act(out)
        if block.downsample is None:
            res = (g, c)
        else:
            nd = _norm(block.downsample.weight)
            res = (nd * g, nd * c + _bias(block.downsample.bias))
        h_sum = (out[0] + res[0], out[1] + res[1])
        g, c = act(h_sum)
        bounds += [conv1, a_sum, a, conv2, out_sum, out, res, h_sum, (g, c)]
        for value, norm in ((conv1, block.norm1), (conv2, block.norm2)):
            if norm is not None:  # its variance squares the values: they stay below
                scale = math.sqrt(limit * norm.weight.numel())  # sqrt(limit / C)
                bounds.append((value[0] * scale, value[1] * scale))
        skips.append(out)
    if net.skips is not None:  # the skip sum, then the activation of it plus the last output
        total = (0.0, 0.0)
        for out, conv in zip(skips, net.skips, strict=False):
            if conv is not None:
                ns = _norm(conv.weight)
                out = (ns * out[0], ns * out[1] + _bias(conv.bias))
            total = (total[0] + out[0], total[1] + out[1])
            bounds += [out, total]
        if net.config.keras_tcn:  # the sum alone
            g, c = total
        else:
            h_sum = (g + total[0], c + total[1])
            g, c = act(h_sum)
            bounds.append(h_sum)
        bounds.append((g, c))
    if net.head is not None:
        nh = _norm(net.head.weight)
        bounds.append((nh * g, nh * c + _bias(net.head.bias)))
    m = min(((limit - ci) / gi if gi > 0 else math.inf) for gi, ci in bounds)
    if not math.isfinite(m):
        return float(torch.finfo(dtype).max)
    return m if m >= SMALLEST_USEFUL_BOUND else None
