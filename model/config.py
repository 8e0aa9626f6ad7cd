"""TCNConfig: the frozen description of a TCN, stored inside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# A block's activation (computed by model/activations.py): pytorch-tcn's and keras-tcn's names;
# keras_leaky_relu is Keras 3's leaky_relu, whose negative slope is 0.2 (torch's is 0.01).
ACTIVATIONS = ("relu", "tanh", "leaky_relu", "elu", "gelu", "selu", "sigmoid", "keras_leaky_relu")
# After the head: none, one of the above per value, or a softmax over the channels.
OUTPUT_ACTIVATIONS = ("none", "sigmoid", "tanh", "softmax", "log_softmax", "relu", "leaky_relu",
                      "elu", "gelu", "selu", "keras_leaky_relu")  # fmt: skip
# How a block takes a sequence's embedding (pytorch-tcn's embedding_mode): added to its first
# conv's output, or concatenated with it and 1x1 conv'd back to its width.
EMBEDDING_MODES = ("add", "concat")


@dataclass(frozen=True)
class TCNConfig:
    """Architecture of a TCN (Bai, Kolter & Koltun 2018); see `receptive_field`."""

    in_channels: int
    channels: tuple[int, ...]
    kernel_size: int = 2
    dilations: tuple[int, ...] | None = None  # default: 2**i for block i
    dropout: float = 0.0  # training only; inference ignores it
    out_channels: int | None = None  # optional per-timestep linear head
    output_activation: str = "none"
    vocab_size: int | None = None  # token-id input through an embedding of width in_channels
    activation: str = "relu"  # of every block's convs and its output (model/activations.py)
    # pytorch-tcn's use_skip_connections: every block's conv output but the last block's (1x1
    # conv'd to the last width where it differs) is added to the last block's output, and the
    # activation taken again.
    skip_connections: bool = False
    # pytorch-tcn's use_gate: each block's first conv has 2 x its width of outputs, and a GLU
    # (first half x sigmoid(second half)) stands in for the activation after it.
    gate: bool = False
    # pytorch-tcn's use_norm="layer_norm": each conv's output normed over its channels, per
    # timestep, before its activation (weight norm and batch norm are folded into the convs).
    layer_norm: bool = False
    layer_norm_eps: float = 1e-5  # nn.LayerNorm's default (pytorch-tcn's); Keras' is 1e-3
    # keras-tcn's block: the second conv's output is activated twice (Act_Conv1D_1, then
    # Act_Conv_Blocks), and skip connections sum every block's second-conv output, the last
    # block's included, in place of the last block's output, with no activation after.
    keras_tcn: bool = False
    # pytorch-tcn's embedding_shapes of (dim,) tuples: each sequence (each stream) is conditioned
    # on static vectors of these widths, concatenated (sum(embedding_dims) values), which every
    # block projects (1x1) to its first conv's width and applies after that conv (and its norm),
    # before the activation or gate, as `embedding_mode` says.
    embedding_dims: tuple[int, ...] | None = None
    embedding_mode: str = "add"

    def __post_init__(self) -> None:
        # Normalise lists (from JSON) to tuples so the config stays hashable and immutable.
        object.__setattr__(self, "channels", _int_tuple("channels", self.channels))
        if self.dilations is None:
            object.__setattr__(self, "dilations", tuple(2**i for i in range(len(self.channels))))
        else:
            object.__setattr__(self, "dilations", _int_tuple("dilations", self.dilations))
        _check_int("in_channels", self.in_channels, minimum=1)
        _check_int("kernel_size", self.kernel_size, minimum=1)
        if not self.channels:
            raise ValueError("channels must list at least one TemporalBlock width, e.g. [64, 64]")
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must all be >= 1, got {list(self.channels)}")
        if len(self.dilations) != len(self.channels):
            raise ValueError(
                f"dilations has {len(self.dilations)} entries but channels has "
                f"{len(self.channels)}: give one dilation per TemporalBlock"
            )
        if any(d < 1 for d in self.dilations):
            raise ValueError(f"dilations must all be >= 1, got {list(self.dilations)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.out_channels is not None:
            _check_int("out_channels", self.out_channels, minimum=1)
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {', '.join(OUTPUT_ACTIVATIONS)}; "
                f"got {self.output_activation!r}"
            )
        if self.vocab_size is not None:
            _check_int("vocab_size", self.vocab_size, minimum=1)
        if not isinstance(self.keras_tcn, bool):
            raise ValueError(f"keras_tcn must be true or false, got {self.keras_tcn!r}")
        if self.keras_tcn and self.skip_connections and len(set(self.channels)) > 1:
            raise ValueError("keras-tcn's skip connections need every block of one width")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"layer_norm_eps must be a number in (0, 1), got {eps!r}")
        if not isinstance(self.layer_norm, bool):
            raise ValueError(f"layer_norm must be true or false, got {self.layer_norm!r}")
        if not isinstance(self.gate, bool):
            raise ValueError(f"gate must be true or false, got {self.gate!r}")
        if not isinstance(self.skip_connections, bool):
            raise ValueError(
                f"skip_connections must be true or false, got {self.skip_connections!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}"
            )
        if self.embedding_dims is not None:
            dims = _int_tuple("embedding_dims", self.embedding_dims)
            if not dims or any(d < 1 for d in dims):
                raise ValueError(
                    "embedding_dims must list the width (>= 1) of each per-sequence embedding, "
                    f"e.g. [16]; got {list(dims)}"
                )
            object.__setattr__(self, "embedding_dims", dims)
        if self.embedding_mode not in EMBEDDING_MODES:
            raise ValueError(
                f"embedding_mode must be one of {', '.join(EMBEDDING_MODES)}; "
                f"got {self.embedding_mode!r}"
            )
        if self.embedding_mode != "add" and self.embedding_dims is None:
            raise ValueError(
                f"embedding_mode={self.embedding_mode!r} needs embedding_dims: a model without "
                "embeddings has nothing to concatenate"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.channels)

    @property
    def output_size(self) -> int:
        """Channels of the per-timestep output."""
        return self.out_channels if self.out_channels is not None else self.channels[-1]

    @property
    def embedding_width(self) -> int:
        """Values of one sequence's embedding (all of embedding_dims together); 0 without."""
        return sum(self.embedding_dims) if self.embedding_dims is not None else 0

    @property
    def receptive_field(self) -> int:
        """Inputs that influence one output: 1 + 2 (k - 1) * sum(dilations)."""
        return 1 + 2 * (self.kernel_size - 1) * sum(self.dilations)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["dilations"] = list(self.dilations)
        if self.embedding_dims is not None:
            d["embedding_dims"] = list(self.embedding_dims)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TCNConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TCNConfig fields: {', '.join(unknown)}")
        return cls(**data)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _int_tuple(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {values!r}")
    out = tuple(values)  # type: ignore[arg-type]
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be a list of integers, got {list(out)!r}")
    return out
