"""TCNConfig: defaults, the receptive-field formula, validation and serialisation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings

from model import TCNConfig
from model.config import ACTIVATIONS, OUTPUT_ACTIVATIONS
from tests.model.conftest import tcn_configs


def test_defaults() -> None:
    c = TCNConfig(in_channels=3, channels=[8, 8, 8, 8])
    assert c.kernel_size == 2
    assert c.dilations == (1, 2, 4, 8)
    assert c.dropout == 0.0
    assert c.out_channels is None
    assert c.output_activation == "none"
    assert c.vocab_size is None
    assert c.num_blocks == 4
    assert c.output_size == 8


def test_output_size_is_the_head_when_present() -> None:
    assert TCNConfig(in_channels=1, channels=[4, 6], out_channels=3).output_size == 3
    assert TCNConfig(in_channels=1, channels=[4, 6]).output_size == 6


@pytest.mark.parametrize(
    ("kernel_size", "channels", "dilations", "expected"),
    [
        (2, [1], None, 3),  # 1 + 2*1*1
        (3, [1, 1, 1], None, 1 + 2 * 2 * 7),
        (7, [64] * 8, None, 3061),  # the reference config R1
        (8, [24] * 8, [1, 2, 4, 8, 16, 32, 64, 128], 3571),
        (1, [5, 5], [3, 9], 1),  # a 1-tap kernel sees only the present
        (4, [2, 2], [5, 1], 1 + 2 * 3 * 6),
    ],
)
def test_receptive_field_examples(
    kernel_size: int, channels: list[int], dilations: list[int] | None, expected: int
) -> None:
    c = TCNConfig(in_channels=2, channels=channels, kernel_size=kernel_size, dilations=dilations)
    assert c.receptive_field == expected


@given(tcn_configs())
@settings(max_examples=50, deadline=None)
def test_receptive_field_formula(c: TCNConfig) -> None:
    assert c.receptive_field == 1 + 2 * (c.kernel_size - 1) * sum(c.dilations)
    assert len(c.dilations) == len(c.channels)


@given(tcn_configs())
@settings(max_examples=50, deadline=None)
def test_dict_round_trip_through_json(c: TCNConfig) -> None:
    d = c.to_dict()
    assert isinstance(d["channels"], list)
    assert isinstance(d["dilations"], list)
    back = TCNConfig.from_dict(json.loads(json.dumps(d)))
    assert back == c
    assert hash(back) == hash(c)


def test_lists_become_tuples() -> None:
    c = TCNConfig(in_channels=2, channels=[3, 4], dilations=[1, 3])
    assert c.channels == (3, 4)
    assert c.dilations == (1, 3)
    assert isinstance(c.channels, tuple)
    assert isinstance(c.dilations, tuple)
    hash(c)  # hashable because nothing mutable is left inside


def test_from_dict_refuses_unknown_fields() -> None:
    d = TCNConfig(in_channels=2, channels=[3]).to_dict()
    d["num_layers"] = 4
    d["norm"] = "batch_norm"
    with pytest.raises(ValueError, match=r"unknown TCNConfig fields: norm, num_layers"):
        TCNConfig.from_dict(d)


def test_old_configs_load_with_the_papers_relu_and_new_ones_keep_their_activation() -> None:
    old = TCNConfig(in_channels=2, channels=[3]).to_dict()
    del old["activation"]  # a checkpoint written before the option existed
    assert TCNConfig.from_dict(old).activation == "relu"
    gelu = TCNConfig(in_channels=2, channels=[3], activation="gelu")
    assert TCNConfig.from_dict(gelu.to_dict()) == gelu
    with pytest.raises(ValueError, match="activation must be one of relu, tanh"):
        TCNConfig(in_channels=2, channels=[3], activation="swish")


def test_old_configs_load_without_embeddings_and_new_ones_keep_theirs() -> None:
    old = TCNConfig(in_channels=2, channels=[3]).to_dict()
    del old["embedding_dims"], old["embedding_mode"]  # written before the options existed
    plain = TCNConfig.from_dict(old)
    assert (plain.embedding_dims, plain.embedding_mode, plain.embedding_width) == (None, "add", 0)
    conditioned = TCNConfig(
        in_channels=2, channels=[3], embedding_dims=[4, 2], embedding_mode="concat"
    )
    assert conditioned.embedding_dims == (4, 2) and conditioned.embedding_width == 6
    d = json.loads(json.dumps(conditioned.to_dict()))
    assert d["embedding_dims"] == [4, 2]
    assert TCNConfig.from_dict(d) == conditioned


def test_from_dict_validates_values() -> None:
    d = TCNConfig(in_channels=2, channels=[3]).to_dict()
    d["kernel_size"] = 0
    with pytest.raises(ValueError, match="kernel_size"):
        TCNConfig.from_dict(d)


def test_frozen() -> None:
    c = TCNConfig(in_channels=2, channels=[3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.kernel_size = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.channels = (4,)  # type: ignore[misc]
    assert c.kernel_size == 2


VALID = {"in_channels": 2, "channels": [4, 4]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"in_channels": 0}, r"in_channels must be an integer >= 1, got 0"),
        ({"in_channels": -3}, r"in_channels must be an integer >= 1"),
        ({"in_channels": 2.0}, r"in_channels must be an integer >= 1, got 2\.0"),
        ({"in_channels": True}, r"in_channels must be an integer"),
        ({"in_channels": "2"}, r"in_channels must be an integer"),
        ({"channels": []}, r"channels must list at least one TemporalBlock"),
        ({"channels": [4, 0]}, r"channels must all be >= 1, got \[4, 0\]"),
        ({"channels": [4, -1]}, r"channels must all be >= 1"),
        ({"channels": [4, 2.5]}, r"channels must be a list of integers"),
        ({"channels": [True]}, r"channels must be a list of integers"),
        ({"channels": 4}, r"channels must be a list of integers"),
        ({"channels": "44"}, r"channels must be a list of integers"),
        ({"channels": None}, r"channels must be a list of integers"),
        ({"kernel_size": 0}, r"kernel_size must be an integer >= 1, got 0"),
        ({"kernel_size": 1.5}, r"kernel_size must be an integer >= 1"),
        ({"dilations": [1]}, r"dilations has 1 entries but channels has 2"),
        ({"dilations": [1, 2, 4]}, r"one dilation per TemporalBlock"),
        ({"dilations": [1, 0]}, r"dilations must all be >= 1, got \[1, 0\]"),
        ({"dilations": [1, 2.0]}, r"dilations must be a list of integers"),
        ({"dilations": 2}, r"dilations must be a list of integers"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1\.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"dropout": math.nan}, r"dropout must be in \[0, 1\)"),
        ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": True}, r"dropout must be a number"),
        ({"out_channels": 0}, r"out_channels must be an integer >= 1, got 0"),
        ({"out_channels": 2.0}, r"out_channels must be an integer >= 1"),
        ({"output_activation": "swish"}, r"output_activation must be one of none, sigmoid, tanh"),
        ({"output_activation": "Softmax"}, r"softmax, log_softmax, relu.*; got 'Softmax'"),
        ({"output_activation": None}, r"output_activation must be one of"),
        ({"vocab_size": 0}, r"vocab_size must be an integer >= 1, got 0"),
        ({"vocab_size": 10.0}, r"vocab_size must be an integer >= 1"),
        ({"embedding_dims": []}, r"embedding_dims must list the width \(>= 1\) of each"),
        ({"embedding_dims": [3, 0]}, r"embedding_dims must list the width .*got \[3, 0\]"),
        ({"embedding_dims": 3}, r"embedding_dims must be a list of integers"),
        ({"embedding_dims": [[3, 100]]}, r"embedding_dims must be a list of integers"),
        ({"embedding_dims": [2.0]}, r"embedding_dims must be a list of integers"),
        ({"embedding_dims": [3], "embedding_mode": "mul"}, r"embedding_mode must be one of add"),
        ({"embedding_mode": "concat"}, r"embedding_mode='concat' needs embedding_dims"),
    ],
)
def test_invalid_values_raise_helpful_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TCNConfig(**{**VALID, **changes})


def test_every_activation_is_accepted() -> None:
    for act in OUTPUT_ACTIVATIONS:
        assert TCNConfig(**VALID, output_activation=act).output_activation == act
    assert set(OUTPUT_ACTIVATIONS) == {"none", "softmax", "log_softmax", *ACTIVATIONS}
    for act in ACTIVATIONS:
        assert TCNConfig(**VALID, activation=act).activation == act


def test_boundary_values_are_accepted() -> None:
    c = TCNConfig(
        in_channels=1, channels=[1], kernel_size=1, dropout=0.0, out_channels=1, vocab_size=1
    )
    assert c.receptive_field == 1
    assert TCNConfig(**VALID, dropout=0.999).dropout == 0.999
