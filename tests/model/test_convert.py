"""Converters: each source model's forward is reproduced by the converted, reloaded TCN."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import StreamPool, pytorch_tcn_options
from model.checkpoint import load_model, read_checkpoint_info
from model.convert import convert_file, convert_pytorch_tcn, convert_state_dict, detect_format
from service import cli
from tests.model.locuslab_reference import (
    PaperLanguageModel,
    PaperSequenceModel,
    PaperTemporalConvNet,
    randomize_,
)

pytorch_tcn = pytest.importorskip("pytorch_tcn")

TOL = {"atol": 1e-5, "rtol": 1e-5}


def inputs(in_channels: int, seed: int, t: int = 48) -> torch.Tensor:
    return torch.randn(2, in_channels, t, generator=torch.Generator().manual_seed(seed))


def converted(tmp_path: Path, state: dict, **kwargs) -> torch.nn.Module:
    """Save `state` with torch.save, convert the file, and load the checkpoint back."""
    torch.save(state, tmp_path / "source.pt")
    convert_file(tmp_path / "source.pt", tmp_path / "ckpt", **kwargs)
    return load_model(tmp_path / "ckpt")


def their_tcn(seed: int, *args, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = randomize_(pytorch_tcn.TCN(*args, **kwargs), seed)
    for name, buf in net.named_buffers():  # streaming state: must not affect the conversion
        if name.endswith("padder.buffer"):
            buf.normal_()
    return net


# --- pytorch-tcn ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_inputs", "channels", "k", "projection", "dilations"),
    [
        (3, [8, 8], 2, None, None),
        (2, [4, 6, 6], 3, 5, None),
        (1, [5, 5, 3], 4, 2, None),
        (4, [6, 4], 5, None, None),
        (3, [4, 4, 6], 3, 3, [1, 3, 2]),  # non-default dilations: read from the buffers
    ],
)
def test_pytorch_tcn_forward_matches(tmp_path, num_inputs, channels, k, projection, dilations):
    theirs = their_tcn(
        0, num_inputs, channels, kernel_size=k, dilations=dilations, output_projection=projection
    )
    assert detect_format(theirs.state_dict()) == "pytorch-tcn"
    ours = converted(tmp_path, theirs.state_dict(), pytorch_tcn_kwargs={})
    assert list(ours.config.channels) == channels
    assert ours.config.kernel_size == k
    assert list(ours.config.dilations) == (dilations or [2**i for i in range(len(channels))])
    assert ours.config.output_size == (projection or channels[-1])
    x = inputs(num_inputs, seed=1)  # theirs is NCL (input_shape default), like ours
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    _, metadata = read_checkpoint_info(tmp_path / "ckpt")
    assert metadata["source_format"] == "pytorch-tcn"
    assert metadata["source_file"] == "source.pt"


def test_pytorch_tcn_output_activation_and_safetensors_input(tmp_path):
    theirs = their_tcn(1, 2, [4, 3], kernel_size=3, output_projection=2, output_activation="tanh")
    save_file(theirs.state_dict(), str(tmp_path / "w.safetensors"))
    kwargs = {"output_activation": "tanh"}
    convert_file(tmp_path / "w.safetensors", tmp_path / "ckpt", pytorch_tcn_kwargs=kwargs)
    x = inputs(2, seed=2)
    torch.testing.assert_close(load_model(tmp_path / "ckpt")(x), theirs(x), **TOL)


def test_pytorch_tcn_without_weight_norm_is_a_plain_conv(tmp_path):
    theirs = their_tcn(2, 3, [5, 5], kernel_size=2, use_norm=None)
    x = inputs(3, seed=3)
    ours = converted(tmp_path, theirs.state_dict(), pytorch_tcn_kwargs={"use_norm": None})
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"use_skip_connections": True}, "use_skip_connections"),
        ({"use_gate": True}, "use_gate"),
        ({"use_norm": "batch_norm"}, "batch-normed"),  # shown by its statistics
        ({"use_norm": "layer_norm"}, "layer-normed"),  # shown by its norm weights
        ({"embedding_shapes": [(3,)]}, "embedding_shapes"),
    ],
)
def test_pytorch_tcn_unsupported_options_are_refused(kwargs, option):
    theirs = pytorch_tcn.TCN(2, [4, 6], kernel_size=3, **kwargs)
    with pytest.raises(ValueError, match=option):  # the file shows these, even unstated
        convert_state_dict(theirs.state_dict(), pytorch_tcn_kwargs={})


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_pytorch_tcn_batch_norm_is_folded_into_the_convs_exactly(tmp_path, activation):
    kwargs = {"use_norm": "batch_norm", "activation": activation, "output_projection": 2}
    theirs = their_tcn(30, 3, [6, 8, 8], kernel_size=3, **kwargs)
    _trained_batch_norms(theirs, 30)
    x = inputs(3, seed=31)
    expected = theirs(x)
    torch.testing.assert_close(convert_pytorch_tcn(theirs)(x), expected, **TOL)
    ours = converted(tmp_path, theirs.state_dict(), pytorch_tcn_kwargs=kwargs)
    torch.testing.assert_close(ours(x), expected, **TOL)
    _, metadata = read_checkpoint_info(tmp_path / "ckpt")
    assert metadata["max_abs_difference"] <= 1e-5


def test_pytorch_tcn_dilations_that_contradict_the_buffers_are_refused():
    theirs = pytorch_tcn.TCN(2, [4, 4], kernel_size=3)
    with pytest.raises(ValueError, match="contradict the padding buffers"):
        convert_state_dict(theirs.state_dict(), dilations=[1, 4], pytorch_tcn_kwargs={})


# --- locuslab/TCN ---------------------------------------------------------------------------


def test_locuslab_bare_network_matches_with_or_without_duplicate_keys(tmp_path):
    theirs = randomize_(PaperTemporalConvNet(3, [6, 6, 4], kernel_size=2), seed=3)
    state = theirs.state_dict()
    assert "network.0.net.0.weight_g" in state and "network.0.conv1.weight_g" in state
    assert detect_format(state) == "locuslab"
    x = inputs(3, seed=4)
    torch.testing.assert_close(converted(tmp_path, state)(x), theirs(x), **TOL)
    one_copy = {k: v for k, v in state.items() if ".net." not in k}
    torch.testing.assert_close(convert_state_dict(one_copy)(x), theirs(x), **TOL)


@pytest.mark.parametrize(("channels", "k"), [([5, 8], 3), ([4, 4, 4], 5)])
def test_locuslab_wrapper_with_prefix_and_linear_head_matches(tmp_path, channels, k):
    theirs = randomize_(PaperSequenceModel(2, channels, k, out=3), seed=5)
    assert "tcn.network.0.conv1.weight_v" in theirs.state_dict()
    ours = converted(tmp_path, theirs.state_dict())
    assert ours.config.out_channels == 3
    x = inputs(2, seed=6)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    _, metadata = read_checkpoint_info(tmp_path / "ckpt")
    assert metadata == {
        "source_format": "locuslab",
        "source_file": "source.pt",
        "dilations": "default 2**i",
    }


def test_locuslab_custom_dilations(tmp_path):
    theirs = randomize_(PaperTemporalConvNet(2, [4, 4, 4], 3, dilations=[1, 3, 5]), seed=7)
    ours = converted(tmp_path, theirs.state_dict(), dilations=(1, 3, 5))
    assert ours.config.dilations == (1, 3, 5)
    assert ours.receptive_field == 1 + 2 * 2 * 9
    x = inputs(2, seed=8, t=80)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_locuslab_language_model_with_tied_decoder(tmp_path):
    theirs = randomize_(PaperLanguageModel(vocab=11, emb=6, channels=[8, 6], kernel_size=2), 9)
    ours = converted(tmp_path, theirs.state_dict())
    assert ours.config.vocab_size == 11 and ours.config.out_channels == 11
    tokens = torch.randint(0, 11, (2, 40), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(ours(tokens), theirs(tokens), **TOL)


def test_locuslab_duplicates_that_differ_are_refused():
    state = PaperTemporalConvNet(2, [4], kernel_size=2).state_dict()
    state["network.0.net.4.bias"] = state["network.0.net.4.bias"] + 1.0
    with pytest.raises(ValueError, match=r"conv2\.bias and its duplicate net\.4\.bias differ"):
        convert_state_dict(state)


# --- files and errors -----------------------------------------------------------------------


def test_a_wrapped_training_checkpoint_is_unwrapped(tmp_path):
    theirs = randomize_(PaperTemporalConvNet(2, [4], kernel_size=2), seed=11)
    ours = converted(tmp_path, {"epoch": 3, "model_state_dict": theirs.state_dict()})
    x = inputs(2, seed=12)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2, 3], "holds a list, not a state_dict"),
        ({"epoch": 3}, "not a state_dict of tensors"),
        ({"state_dict": {}, "model_state_dict": {}}, "ambiguous"),
        ({"encoder.weight": torch.zeros(2, 2)}, "unknown state_dict layout"),
    ],
)
def test_files_that_are_not_a_tcn_state_dict_are_refused(tmp_path, payload, message):
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message):
        convert_file(tmp_path / "bad.pt", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_inconsistent_shapes_are_refused():
    state = PaperTemporalConvNet(2, [4, 6], kernel_size=2).state_dict()
    wrong = torch.randn(6, 5, 2)  # block 1 must take block 0's 4 channels
    state["network.1.conv1.weight_v"] = state["network.1.net.0.weight_v"] = wrong
    with pytest.raises(ValueError, match=r"network\.1\.conv1\.weight: expected shape \(6, 4, 2\)"):
        convert_state_dict(state)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("UNPICKLED CODE RAN",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": _RunsCodeWhenUnpickled()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        convert_file(tmp_path / "evil.pt", tmp_path / "ckpt")
    assert "UNPICKLED CODE RAN" not in capsys.readouterr().out


def test_a_whole_pickled_model_is_refused(tmp_path):
    torch.save(PaperTemporalConvNet(2, [4], kernel_size=2), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.state_dict\(\)"):
        convert_file(tmp_path / "model.pt", tmp_path / "ckpt")


# --- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def convert_only_cli(monkeypatch):
    # Other subcommands are built elsewhere; the parser imports every one of them.
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})


def test_cli_converts_and_prints_a_summary(tmp_path, capsys, convert_only_cli):
    theirs = their_tcn(12, 3, [4, 5], kernel_size=3, output_projection=2)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    argv = ["convert", str(tmp_path / "theirs.pt"), str(tmp_path / "ckpt")]
    assert cli.main([*argv, "--pytorch-tcn-kwargs", '{"output_projection": 2}']) == 0
    out = capsys.readouterr().out
    assert "pytorch-tcn" in out and "receptive_field=13" in out
    assert "verified against pytorch-tcn 1.2.3" in out
    x = inputs(3, seed=13)
    torch.testing.assert_close(load_model(tmp_path / "ckpt")(x), theirs(x), **TOL)


def test_cli_passes_dilations_and_output_activation(tmp_path, capsys, convert_only_cli):
    theirs = randomize_(PaperTemporalConvNet(2, [4, 4], 2, dilations=[1, 3]), seed=14)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    argv = ["convert", str(tmp_path / "theirs.pt"), str(tmp_path / "ckpt")]
    assert cli.main([*argv, "--dilations", "1,3", "--output-activation", "sigmoid"]) == 0
    ours = load_model(tmp_path / "ckpt")
    assert ours.config.dilations == (1, 3) and ours.config.output_activation == "sigmoid"
    x = inputs(2, seed=15)
    torch.testing.assert_close(ours(x), torch.sigmoid(theirs(x)), **TOL)


def test_cli_reports_a_bad_file_with_exit_code_2(tmp_path, capsys, convert_only_cli):
    (tmp_path / "junk.pt").write_text("not a checkpoint\n")
    assert cli.main(["convert", str(tmp_path / "junk.pt"), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "junk.pt" in err


# --- pytorch-tcn: what a state_dict cannot show is stated, never assumed --------------------

# The options of the table: each changes the forward and leaves the state_dict as it is.
HIDDEN = [
    ({"causal": False}, "causal=False: each output then depends on later inputs"),
    ({"output_projection": 3, "output_activation": "softmax"}, "normalises over the batch"),
    ({"activation": "softmax"}, "normalises over the batch"),
]
# The activations that convert (each converted exactly below); unstated, each is refused.
PYTORCH_TCN_ACTIVATIONS = ["relu", "tanh", "leaky_relu", "sigmoid", "elu", "gelu", "selu"]


def test_unstated_skip_connections_are_never_assumed():
    # One width: the weights show no skip convs, so only the stated options can tell.
    state = their_tcn(20, 3, [8] * 3, kernel_size=3, use_skip_connections=True).state_dict()
    with pytest.raises(ValueError, match="--pytorch-tcn-kwargs"):
        convert_state_dict(state)


@pytest.mark.parametrize("activation", PYTORCH_TCN_ACTIVATIONS[1:])
def test_an_unstated_activation_is_never_assumed(activation):
    state = their_tcn(20, 3, [16] * 4, kernel_size=3, activation=activation).state_dict()
    with pytest.raises(ValueError, match="--pytorch-tcn-kwargs"):
        convert_state_dict(state)


@pytest.mark.parametrize(("kwargs", "message"), HIDDEN)
def test_options_a_state_dict_hides_are_never_assumed(tmp_path, kwargs, message):
    theirs = their_tcn(20, 3, [16] * 4, kernel_size=3, **kwargs)
    state = theirs.state_dict()
    assert detect_format(state) == "pytorch-tcn"
    with pytest.raises(ValueError, match="--pytorch-tcn-kwargs"):  # unstated: refused
        convert_state_dict(state)
    with pytest.raises(ValueError, match=re.escape(message)):  # stated: refused by name
        convert_state_dict(state, pytorch_tcn_kwargs=kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):  # the live module: read, refused
        convert_pytorch_tcn(theirs)
    torch.save(state, tmp_path / "theirs.pt")
    with pytest.raises(ValueError):
        convert_file(tmp_path / "theirs.pt", tmp_path / "ckpt", pytorch_tcn_kwargs=kwargs)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_norm": None},
        {"input_shape": "NLC", "output_projection": 2, "output_activation": "sigmoid"},
        {"dilations": [1, 3, 2], "output_projection": 4, "output_activation": "tanh"},
        {"dilation_reset": 2, "dropout": 0.3, "kernel_initializer": "kaiming_uniform"},
        *({"activation": a} for a in PYTORCH_TCN_ACTIVATIONS[1:]),
        {"activation": "gelu", "output_projection": 2, "output_activation": "relu"},
        {"activation": "elu", "output_projection": 2, "output_activation": "selu"},
        {"use_skip_connections": True},  # widths 6, 8, 8: one 1x1 skip conv, one identity
        {"use_skip_connections": True, "activation": "gelu", "use_norm": None},
        {"use_gate": True},
        {"use_gate": True, "use_skip_connections": True, "activation": "elu"},
        {"use_gate": True, "use_norm": "batch_norm", "output_projection": 2},
        {"use_norm": "layer_norm", "activation": "gelu"},
        {"use_norm": "layer_norm", "use_gate": True, "use_skip_connections": True},
    ],
    ids=repr,
)
def test_the_live_module_and_stated_options_convert_exactly(tmp_path, kwargs):
    theirs = their_tcn(21, 3, [6, 8, 8], kernel_size=3, **kwargs).eval()
    x = inputs(3, seed=22)
    theirs_x = x.transpose(1, 2) if kwargs.get("input_shape") == "NLC" else x
    expected = theirs(theirs_x)
    if kwargs.get("input_shape") == "NLC":
        expected = expected.transpose(1, 2)
    torch.testing.assert_close(convert_pytorch_tcn(theirs)(x), expected, **TOL)
    ours = converted(tmp_path, theirs.state_dict(), pytorch_tcn_kwargs=kwargs)
    torch.testing.assert_close(ours(x), expected, **TOL)
    _, metadata = read_checkpoint_info(tmp_path / "ckpt")
    assert metadata["verified_against"] == "pytorch-tcn 1.2.3"
    assert metadata["max_abs_difference"] <= 1e-5
    assert metadata["pytorch_tcn_kwargs"] == kwargs


def test_stated_options_that_contradict_the_weights_are_refused():
    plain = their_tcn(23, 2, [4, 4], kernel_size=3, use_norm=None).state_dict()
    message = re.escape("use_norm='weight_norm' (the weights are plain")
    with pytest.raises(ValueError, match=message):
        convert_state_dict(plain, pytorch_tcn_kwargs={})
    state = their_tcn(24, 2, [4, 4], kernel_size=3).state_dict()
    for wrong, message in (
        ({"num_channels": [4, 5]}, "num_channels"),
        ({"kernel_size": 4}, "kernel_size=4"),
        ({"dilations": [1, 4]}, "dilations"),
        ({"num_inputs": 3}, "num_inputs=3"),
        ({"colour": "red"}, "unknown pytorch-tcn"),
    ):
        with pytest.raises(ValueError, match=message):
            convert_state_dict(state, pytorch_tcn_kwargs=wrong)


def test_a_conversion_that_differs_from_the_library_is_not_written(tmp_path, monkeypatch):
    theirs = their_tcn(25, 2, [4, 4], kernel_size=3)
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    rebuild = pytorch_tcn_options.rebuild

    def drifted(*args):  # the library computing something else than the conversion
        source = rebuild(*args)
        with torch.no_grad():
            source.network[1].conv2.bias.add_(1e-3)
        return source

    monkeypatch.setattr(pytorch_tcn_options, "rebuild", drifted)
    with pytest.raises(ValueError, match="differs from pytorch-tcn's own forward by"):
        convert_file(tmp_path / "theirs.pt", tmp_path / "ckpt", pytorch_tcn_kwargs={})
    assert not (tmp_path / "ckpt").exists()


def test_without_pytorch_tcn_the_checkpoint_says_it_was_not_verified(tmp_path, monkeypatch):
    theirs = their_tcn(26, 2, [4, 4], kernel_size=3)
    monkeypatch.setattr(pytorch_tcn_options, "available", lambda: False)
    ours = converted(tmp_path, theirs.state_dict(), pytorch_tcn_kwargs={})
    _, metadata = read_checkpoint_info(tmp_path / "ckpt")
    assert metadata["verified_against"] is None and "max_abs_difference" not in metadata
    x = inputs(2, seed=27)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_cli_refuses_pytorch_tcn_without_its_options(tmp_path, capsys, convert_only_cli):
    torch.save(their_tcn(28, 2, [4], kernel_size=3).state_dict(), tmp_path / "theirs.pt")
    argv = ["convert", str(tmp_path / "theirs.pt"), str(tmp_path / "ckpt")]
    assert cli.main(argv) == 2
    assert "--pytorch-tcn-kwargs" in capsys.readouterr().err
    assert cli.main([*argv, "--pytorch-tcn-kwargs", '{"activation": "softmax"}']) == 2
    assert "activation='softmax'" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_cli_refuses_to_replace_a_checkpoint_unless_told(tmp_path, capsys, convert_only_cli):
    torch.save(their_tcn(40, 2, [4], kernel_size=3).state_dict(), tmp_path / "theirs.pt")
    argv = ["convert", str(tmp_path / "theirs.pt"), str(tmp_path / "ckpt")]
    argv += ["--pytorch-tcn-kwargs", "{}"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 2
    assert "already holds a checkpoint: pass --overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0


# --- pytorch-tcn: embedding_shapes of (dim,) tuples, each sequence's static conditioning ------

EMBEDDING_NORMS = ["weight_norm", "batch_norm", "layer_norm", None]


def _embeddings(seed: int, dims=(3, 2)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, d, generator=gen) for d in dims]


def _trained_batch_norms(net: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained statistics, far from the initial (0, 1)
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 3 + 0.1)


@pytest.mark.parametrize("skips", [False, True], ids=["", "skips"])
@pytest.mark.parametrize("norm", EMBEDDING_NORMS, ids=str)
@pytest.mark.parametrize("gate", [False, True], ids=["", "gate"])
@pytest.mark.parametrize("mode", ["add", "concat"])
def test_static_embeddings_convert_exactly_and_stream(tmp_path, mode, gate, norm, skips):
    kwargs = {
        "embedding_shapes": [[3], [2]],
        "embedding_mode": mode,
        "use_gate": gate,
        "use_norm": norm,
        "use_skip_connections": skips,
        "output_projection": 2,
    }
    theirs = their_tcn(50, 3, [6, 8, 8], kernel_size=3, **kwargs).eval()
    if norm == "batch_norm":
        _trained_batch_norms(theirs, 51)
    x, embeddings = inputs(3, seed=52), _embeddings(53)
    with torch.no_grad():
        expected = theirs(x, embeddings=embeddings)
    live = convert_pytorch_tcn(theirs)
    assert live.config.embedding_dims == (3, 2) and live.config.embedding_mode == mode
    torch.testing.assert_close(live(x, embeddings=embeddings), expected, **TOL)
    ours = converted(tmp_path, theirs.state_dict(), pytorch_tcn_kwargs=kwargs)
    torch.testing.assert_close(ours(x, embeddings=embeddings), expected, **TOL)
    _, metadata = read_checkpoint_info(tmp_path / "ckpt")
    assert metadata["verified_against"] == "pytorch-tcn 1.2.3"
    assert metadata["max_abs_difference"] <= 1e-5
    # and streamed: one stream per sequence, each opened with its embedding
    pool = StreamPool(ours, 2)
    for i in range(2):
        slot = pool.open(embedding=[e[i] for e in embeddings])
        y = torch.cat([pool.push(slot, x[i, :, :20].T), pool.push(slot, x[i, :, 20:].T)])
        torch.testing.assert_close(y, expected[i].T, **TOL)


def test_one_static_embedding_converts_through_the_cli(tmp_path, convert_only_cli):
    theirs = their_tcn(54, 2, [4, 4], kernel_size=3, embedding_shapes=[(5,)],
                       embedding_mode="concat", use_norm="layer_norm")  # fmt: skip
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    argv = ["convert", str(tmp_path / "theirs.pt"), str(tmp_path / "ckpt"), "--pytorch-tcn-kwargs"]
    options = '{"embedding_shapes": [[5]], "embedding_mode": "concat", "use_norm": "layer_norm"}'
    assert cli.main([*argv, options]) == 0
    x, (e,) = inputs(2, seed=55), _embeddings(56, dims=(5,))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(x, e), theirs(x, e), **TOL)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ([(3, 48)], r"embedding_shapes entry \(3, 48\): a \(dim, time_steps\) shape is a "
                    r"time-varying embedding.*cannot be served one timestep at a time"),
        ([(3,), (2, 48)], r"embedding_shapes entry \(2, 48\).*time-varying"),
    ],
    ids=["time-varying", "one of two time-varying"],
)  # fmt: skip
def test_time_varying_embeddings_are_refused_by_name(shapes, message):
    theirs = their_tcn(57, 3, [4, 4], kernel_size=3, embedding_shapes=shapes)
    with pytest.raises(ValueError, match=message):
        convert_pytorch_tcn(theirs)
    listed = [list(shape) for shape in shapes]  # as --pytorch-tcn-kwargs JSON gives them
    with pytest.raises(ValueError, match=message):
        convert_state_dict(theirs.state_dict(), pytorch_tcn_kwargs={"embedding_shapes": listed})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"embedding_shapes=None \(the blocks hold embedding_projection_1 convs of 5 input"),
        ({"embedding_shapes": [[4]]}, r"embedding_shapes \[\(4,\)\] \(4 values in all\), but"),
        ({"embedding_shapes": [[5]], "embedding_mode": "mul"}, r"embedding_mode='mul'"),
        ({"embedding_shapes": [5]}, r"embedding_shapes entry 5: a \(dim,\) shape"),
        ({"embedding_shapes": "5"}, r"embedding_shapes='5': a list of \(dim,\) shapes"),
    ],
    ids=["unstated", "other width", "unknown mode", "not a shape", "a string"],
)
def test_embedding_options_that_contradict_the_weights_are_refused(kwargs, message):
    state = their_tcn(58, 3, [4, 4], kernel_size=3, embedding_shapes=[(2,), (3,)]).state_dict()
    with pytest.raises(ValueError, match=message):
        convert_state_dict(state, pytorch_tcn_kwargs=kwargs)
    plain = their_tcn(59, 3, [4, 4], kernel_size=3).state_dict()
    with pytest.raises(ValueError, match=r"embedding_projection_1 convs are none"):
        convert_state_dict(plain, pytorch_tcn_kwargs={"embedding_shapes": [[5]]})


def test_the_check_against_pytorch_tcn_feeds_embeddings(tmp_path, monkeypatch):
    """A conversion that is wrong only where the embeddings enter is not written."""
    theirs = their_tcn(60, 2, [4, 4], kernel_size=3, embedding_shapes=[(3,)])
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")
    rebuild = pytorch_tcn_options.rebuild

    def drifted(*args):
        source = rebuild(*args)
        with torch.no_grad():
            source.network[1].embedding_projection_1.weight.add_(1e-3)
        return source

    monkeypatch.setattr(pytorch_tcn_options, "rebuild", drifted)
    kwargs = {"embedding_shapes": [[3]]}
    with pytest.raises(ValueError, match="differs from pytorch-tcn's own forward by"):
        convert_file(tmp_path / "theirs.pt", tmp_path / "ckpt", pytorch_tcn_kwargs=kwargs)
    assert not (tmp_path / "ckpt").exists()
