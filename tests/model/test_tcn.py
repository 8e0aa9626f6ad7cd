"""TCN: shapes, activations, causality, the exact receptive field, and weight-norm folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from model import TCN, TCNConfig
from model.config import OUTPUT_ACTIVATIONS
from tests.model.conftest import positive_net, random_net, tcn_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_float_input_shape() -> None:
    net = random_net(TCNConfig(in_channels=3, channels=[4, 5], kernel_size=3), seed=0)
    assert net(torch.randn(2, 3, 11)).shape == (2, 5, 11)


def test_head_sets_output_channels() -> None:
    net = random_net(TCNConfig(in_channels=3, channels=[4, 5], out_channels=2), seed=0)
    assert net(torch.randn(4, 3, 7)).shape == (4, 2, 7)


def test_token_input_shape() -> None:
    c = TCNConfig(in_channels=6, channels=[4, 4], kernel_size=3, vocab_size=10, out_channels=10)
    net = random_net(c, seed=0)
    tokens = torch.randint(0, 10, (3, 9))
    assert net(tokens).shape == (3, 10, 9)
    assert net(tokens.int()).shape == (3, 10, 9)


def test_single_timestep_and_single_channel() -> None:
    net = random_net(TCNConfig(in_channels=1, channels=[1], kernel_size=4), seed=0)
    assert net(torch.randn(1, 1, 1)).shape == (1, 1, 1)


@pytest.mark.parametrize("activation", OUTPUT_ACTIVATIONS)
def test_output_activation_is_applied_over_channels(activation: str) -> None:
    base = TCNConfig(in_channels=2, channels=[4, 4], kernel_size=3, out_channels=5)
    raw_net = random_net(base, seed=1)
    net = TCN(TCNConfig(**{**base.to_dict(), "output_activation": activation}))
    net.fold_weight_norm().load_state_dict(raw_net.state_dict())
    net.eval()
    x = torch.randn(2, 2, 8)
    raw, y = raw_net(x), net(x)
    assert raw.std() > 0.1  # the activations below are all visibly non-trivial on this
    expected = {
        "none": raw,
        "sigmoid": torch.sigmoid(raw),
        "tanh": torch.tanh(raw),
        "softmax": F.softmax(raw, dim=1),
        "log_softmax": F.log_softmax(raw, dim=1),
        **{name: module(raw) for name, module in REFERENCE_ACTIVATIONS.items()},
    }[activation]
    torch.testing.assert_close(y, expected)
    if activation == "softmax":
        torch.testing.assert_close(y.sum(1), torch.ones(2, 8))
    if activation == "log_softmax":
        torch.testing.assert_close(y.exp().sum(1), torch.ones(2, 8))


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.randn(2, 7), ValueError, r"expected input of shape \(B, 3, T\), got \(2, 7\)"),
        (torch.randn(2, 4, 7), ValueError, r"expected input of shape \(B, 3, T\)"),
        (torch.randn(3, 7), ValueError, r"\(B, 3, T\)"),
        (torch.randn(1, 2, 3, 7), ValueError, r"\(B, 3, T\)"),
        (torch.ones(2, 3, 7, dtype=torch.int64), TypeError, r"floating-point input"),
    ],
)
def test_float_model_rejects_bad_input(x: torch.Tensor, error: type, message: str) -> None:
    net = random_net(TCNConfig(in_channels=3, channels=[4]), seed=0)
    with pytest.raises(error, match=message):
        net(x)


@pytest.mark.parametrize(
    "x",
    [torch.randn(2, 7), torch.zeros(2, 3, 7, dtype=torch.int64), torch.zeros(7, dtype=torch.int64)],
)
def test_token_model_rejects_bad_input(x: torch.Tensor) -> None:
    net = random_net(TCNConfig(in_channels=3, channels=[4], vocab_size=5), seed=0)
    with pytest.raises(ValueError, match=r"token ids of shape \(B, T\) int64"):
        net(x)


# Each activation as torch's own module with its defaults (what pytorch-tcn instantiates).
REFERENCE_ACTIVATIONS = {
    "relu": torch.nn.ReLU(),
    "tanh": torch.nn.Tanh(),
    "leaky_relu": torch.nn.LeakyReLU(),
    "elu": torch.nn.ELU(),
    "gelu": torch.nn.GELU(),
    "selu": torch.nn.SELU(),
    "sigmoid": torch.nn.Sigmoid(),
    "keras_leaky_relu": torch.nn.LeakyReLU(0.2),  # Keras 3's leaky_relu
}


def _reference_forward(net: TCN, x: torch.Tensor) -> torch.Tensor:
    """The paper's block written out from the folded weights: an independent oracle."""
    c, w = net.config, net.state_dict()
    act = REFERENCE_ACTIVATIONS[c.activation]
    total = None

    def normed(v: torch.Tensor, prefix: str) -> torch.Tensor:  # nn.LayerNorm per timestep
        if not c.layer_norm:
            return v
        shape = (v.shape[1],)
        return F.layer_norm(
            v.transpose(1, 2), shape, w[prefix + "weight"], w[prefix + "bias"]
        ).transpose(1, 2)

    h = F.embedding(x, w["embedding.weight"]).transpose(1, 2) if c.vocab_size else x
    for i, d in enumerate(c.dilations):
        p = f"blocks.{i}."
        pad = (c.kernel_size - 1) * d
        a = F.conv1d(F.pad(h, (pad, 0)), w[p + "conv1.weight"], w[p + "conv1.bias"], 1, 0, d)
        a = normed(a, p + "norm1.")
        a = torch.nn.GLU(dim=1)(a) if c.gate else act(a)
        a = F.conv1d(F.pad(a, (pad, 0)), w[p + "conv2.weight"], w[p + "conv2.bias"], 1, 0, d)
        a = act(normed(a, p + "norm2."))
        if c.keras_tcn:  # Act_Conv_Blocks
            a = act(a)
        if p + "downsample.weight" in w:
            h = F.conv1d(h, w[p + "downsample.weight"], w[p + "downsample.bias"])
        h = act(a + h)
        if c.skip_connections and (c.keras_tcn or i < len(c.dilations) - 1):
            s = f"skips.{i}."
            skip = F.conv1d(a, w[s + "weight"], w[s + "bias"]) if s + "weight" in w else a
            total = skip if total is None else total + skip
    if c.skip_connections:  # keras-tcn: the sum of every block's; pytorch-tcn: act(h + sum)
        h = total if c.keras_tcn else act(h if total is None else h + total)
    if c.out_channels is not None:
        h = torch.einsum("bct,oc->bot", h, w["head.weight"]) + w["head.bias"][:, None]
    return h


@given(config=tcn_configs(), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_forward_matches_the_papers_architecture(config: TCNConfig, seed: int) -> None:
    config = TCNConfig(**{**config.to_dict(), "output_activation": "none"})
    net = random_net(config, seed)
    gen = torch.Generator().manual_seed(seed)
    x = (
        torch.randint(0, config.vocab_size, (2, 17), generator=gen)
        if config.vocab_size
        else torch.randn(2, config.in_channels, 17, generator=gen)
    )
    with torch.no_grad():
        torch.testing.assert_close(net(x), _reference_forward(net, x), atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training() -> None:
    c = TCNConfig(in_channels=2, channels=[8, 8], kernel_size=3, dropout=0.5)
    net = random_net(c, seed=0)
    no_dropout = TCN(TCNConfig(**{**c.to_dict(), "dropout": 0.0})).fold_weight_norm()
    no_dropout.load_state_dict(net.state_dict())
    x = torch.randn(2, 2, 10)
    torch.testing.assert_close(net.eval()(x), no_dropout.eval()(x))
    assert not torch.allclose(net.train()(x), no_dropout(x))


def test_residual_uses_1x1_conv_only_when_width_changes() -> None:
    net = TCN(TCNConfig(in_channels=3, channels=[3, 5, 5, 2]))
    assert [b.downsample is not None for b in net.blocks] == [False, True, False, True]


@given(config=tcn_configs(), seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=30, deadline=None)
def test_causal(config: TCNConfig, seed: int, data: st.DataObject) -> None:
    net = random_net(config, seed)
    length = data.draw(st.integers(2, 40), label="length")
    cut = data.draw(st.integers(1, length - 1), label="cut")
    gen = torch.Generator().manual_seed(seed)
    if config.vocab_size is not None:
        x = torch.randint(0, config.vocab_size, (2, length), generator=gen)
        x2 = x.clone()
        x2[:, cut:] = (x2[:, cut:] + 1) % config.vocab_size
    else:
        x = torch.randn(2, config.in_channels, length, generator=gen)
        x2 = x.clone()
        x2[..., cut:] = torch.randn(2, config.in_channels, length - cut, generator=gen) * 10
    with torch.no_grad():
        torch.testing.assert_close(net(x2)[..., :cut], net(x)[..., :cut], atol=1e-6, rtol=1e-6)


RECEPTIVE_FIELD_CONFIGS = [
    TCNConfig(in_channels=1, channels=[1], kernel_size=2),
    TCNConfig(in_channels=2, channels=[3, 3, 2], kernel_size=3),
    TCNConfig(in_channels=3, channels=[2, 4], kernel_size=4, dilations=[3, 1], out_channels=2),
    TCNConfig(in_channels=2, channels=[2, 2], kernel_size=1, dilations=[4, 4]),
    TCNConfig(in_channels=1, channels=[2, 2, 2, 2], kernel_size=2),
]


@pytest.mark.parametrize("config", RECEPTIVE_FIELD_CONFIGS, ids=lambda c: f"R{c.receptive_field}")
def test_receptive_field_is_exact(config: TCNConfig) -> None:
    """Output t depends on inputs t-R+1 .. t and on nothing earlier.

    Positive weights and inputs keep every ReLU in its linear part, so each path through the
    network contributes a strictly positive gradient: a tap the formula forgot shows up as a
    nonzero gradient outside the window, a tap it invented as a zero inside.
    """
    net = positive_net(config, seed=0)
    r = config.receptive_field
    length = r + 6
    x = torch.rand(1, config.in_channels, length, dtype=torch.float64).add_(0.1)
    x.requires_grad_(True)
    y = net(x)
    for t in (length - 1, r - 1, r // 2, 0):
        (grad,) = torch.autograd.grad(y[0, :, t].sum(), x, retain_graph=True)
        influence = grad.abs().sum(dim=(0, 1))  # (T,)
        first = max(0, t - r + 1)
        assert (influence[first : t + 1] > 0).all(), f"t={t}: a tap inside the window is dead"
        assert (influence[:first] == 0).all(), f"t={t}: reaches back past the receptive field"
        assert (influence[t + 1 :] == 0).all(), f"t={t}: not causal"


def test_receptive_field_by_perturbation() -> None:
    """The same claim without autograd: perturb input t-R+1 (changes y_t), t-R (does not)."""
    config = RECEPTIVE_FIELD_CONFIGS[2]
    net = positive_net(config, seed=1)
    r = net.receptive_field
    assert r == config.receptive_field
    t = r + 3
    x = torch.rand(1, config.in_channels, t + 1, dtype=torch.float64) + 0.1
    with torch.no_grad():
        base = net(x)[0, :, t]
        inside, outside = x.clone(), x.clone()
        inside[0, :, t - r + 1] += 1.0
        outside[0, :, t - r] += 1.0
        assert (net(inside)[0, :, t] - base).abs().min() > 1e-6
        torch.testing.assert_close(net(outside)[0, :, t], base, atol=0, rtol=0)


def _parametrized_convs(net: TCN) -> list[str]:
    return [name for name, m in net.named_modules() if parametrize.is_parametrized(m)]


@pytest.mark.parametrize(
    "config",
    [
        TCNConfig(in_channels=2, channels=[4, 3], kernel_size=3, out_channels=2),
        TCNConfig(in_channels=5, channels=[5, 5], kernel_size=2, vocab_size=9),
    ],
)
def test_fold_weight_norm_keeps_forward(config: TCNConfig) -> None:
    net = random_net(config, seed=3, fold=False)
    assert len(_parametrized_convs(net)) == 2 * config.num_blocks
    assert not net.weight_norm_folded
    x = (
        torch.randint(0, config.vocab_size, (2, 12))
        if config.vocab_size
        else torch.randn(2, config.in_channels, 12)
    )
    with torch.no_grad():
        before = net(x)
        folded_state = net.folded_state_dict()
        assert _parametrized_convs(net) != []  # folded_state_dict leaves the module alone
        assert net.fold_weight_norm() is net
        after = net(x)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert _parametrized_convs(net) == []
    assert net.weight_norm_folded
    assert not any("parametrizations" in k for k in net.state_dict())
    state = net.state_dict()
    assert set(folded_state) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(folded_state[key], value, atol=1e-7, rtol=1e-6, msg=key)
    net.fold_weight_norm()  # idempotent
    torch.testing.assert_close(net(x), after, atol=0, rtol=0)


def test_folded_state_dict_loads_into_a_folded_model() -> None:
    config = TCNConfig(in_channels=2, channels=[3, 4], kernel_size=3, out_channels=1)
    net = random_net(config, seed=5, fold=False)
    other = TCN(config).fold_weight_norm().eval()
    other.load_state_dict(net.folded_state_dict())  # strict: same keys, same shapes
    x = torch.randn(1, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(other(x), net(x), atol=1e-6, rtol=1e-6)


def test_init_is_what_the_reference_trains_with() -> None:
    """nn.Conv1d's default on the dilated convs (locuslab's N(0, 0.01) there never takes effect
    under old-style weight norm); N(0, 0.01) on the 1x1 downsample and the head."""
    torch.manual_seed(0)
    net = TCN(TCNConfig(in_channels=4, channels=[64, 64], kernel_size=3, out_channels=2))
    net.fold_weight_norm()
    for block in net.blocks:
        for conv in (block.conv1, block.conv2):
            fan_in = conv.in_channels * conv.kernel_size[0]
            expected = 1 / (3 * fan_in) ** 0.5  # the std of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert 0.8 * expected < conv.weight.std() < 1.2 * expected
    assert net.blocks[0].downsample is not None
    assert 0.005 < net.blocks[0].downsample.weight.std() < 0.02
    assert net.head is not None
    assert 0.005 < net.head.weight.std() < 0.02


# ----- per-sequence embeddings (pytorch-tcn's embedding_shapes of (dim,) tuples) ----------

EMBEDDED = TCNConfig(
    in_channels=3, channels=[4, 6], kernel_size=3, out_channels=2, embedding_dims=[2, 3]
)


def test_embeddings_as_one_tensor_or_one_per_entry_are_the_same() -> None:
    net = random_net(EMBEDDED, seed=0)
    x, e = torch.randn(2, 3, 9), torch.randn(2, 5)
    with torch.no_grad():
        whole = net(x, embeddings=e)
        torch.testing.assert_close(net(x, embeddings=[e[:, :2], e[:, 2:]]), whole, atol=0, rtol=0)
        torch.testing.assert_close(net(x, embeddings=(e,)), whole, atol=0, rtol=0)
        # each sequence is conditioned on its own row only
        torch.testing.assert_close(net(x[1:], embeddings=e[1:]), whole[1:])
        assert not torch.allclose(net(x, embeddings=e.flip(0)), whole)


def test_an_added_embedding_is_a_per_sequence_bias_of_each_first_conv() -> None:
    """Mode "add": c = P e + p joins conv1's output before the activation, at every timestep."""
    net = random_net(EMBEDDED, seed=1)
    plain = TCN(TCNConfig(**{**EMBEDDED.to_dict(), "embedding_dims": None})).fold_weight_norm()
    plain.load_state_dict(
        {k: v for k, v in net.state_dict().items() if "embedding_projection" not in k}
    )
    x, e = torch.randn(1, 3, 12), torch.randn(1, 5)
    with torch.no_grad():
        for block, shifted in zip(net.blocks, plain.blocks, strict=True):
            proj = block.embedding_projection
            shifted.conv1.bias.add_(proj.weight[:, :, 0] @ e[0] + proj.bias)
        torch.testing.assert_close(net(x, embeddings=e), plain.eval()(x))


@pytest.mark.parametrize(
    ("embeddings", "error", "message"),
    [
        (None, ValueError, r"conditioned on per-sequence embeddings of widths \[2, 3\]"),
        (torch.randn(2, 4), ValueError, r"expected an embedding of shape \(2, 5\), got \(2, 4\)"),
        (torch.randn(1, 5), ValueError, r"shape \(2, 5\)"),
        ([torch.randn(2, 3), torch.randn(2, 2)], ValueError, r"shape \(2, 2\), got \(2, 3\)"),
        ([torch.randn(2, 2)] * 3, ValueError, r"expected 2 embeddings \(widths \[2, 3\]\)"),
        (torch.randn(2, 5, 9), ValueError, r"vary over time; this model takes one static"),
        (torch.ones(2, 5, dtype=torch.int64), TypeError, r"floating-point tensors, got torch"),
        ([[0.0] * 5] * 2, TypeError, r"floating-point tensors, got list"),
    ],
    ids=["missing", "too narrow", "batch", "entries swapped", "three", "per timestep", "ints",
         "lists"],
)  # fmt: skip
def test_a_conditioned_model_refuses_missing_or_misshapen_embeddings(
    embeddings, error: type, message: str
) -> None:
    net = random_net(EMBEDDED, seed=0)
    with pytest.raises(error, match=message):
        net(torch.randn(2, 3, 9), embeddings=embeddings)


def test_a_plain_model_refuses_embeddings() -> None:
    net = random_net(TCNConfig(in_channels=3, channels=[4]), seed=0)
    with pytest.raises(ValueError, match="this model takes no embeddings"):
        net(torch.randn(2, 3, 9), embeddings=torch.randn(2, 5))


@pytest.mark.parametrize("mode", ["add", "concat"])
def test_embedding_projections_are_saved_and_fold_with_weight_norm(mode: str) -> None:
    config = TCNConfig(**{**EMBEDDED.to_dict(), "embedding_mode": mode, "gate": True})
    net = random_net(config, seed=2, fold=False)
    names = {k.split(".")[2] for k in net.folded_state_dict() if k.startswith("blocks.")}
    assert "embedding_projection" in names
    assert ("concat_projection" in names) == (mode == "concat")
    other = TCN(config).fold_weight_norm().eval()
    other.load_state_dict(net.folded_state_dict())
    x, e = torch.randn(2, 3, 9), torch.randn(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(other(x, embeddings=e), net(x, embeddings=e))
