"""Build the keras-tcn fixtures of tests/model/test_keras_tcn.py with real keras-tcn.

keras-tcn imports TensorFlow, which tcnserve never needs: run this in a venv of its own,

    python3 -m venv /tmp/tfv && /tmp/tfv/bin/pip install "tensorflow-cpu<2.20" "keras-tcn==3.5.*"
    /tmp/tfv/bin/python scripts/make_keras_tcn_fixtures.py tests/model/fixtures/keras_tcn

Each fixture is a saved `.keras` model (random weights, seeded) and `<name>.npz` holding a
random input `x` (1, T, C) and the model's own output `y` on it (`model(x)`, inference mode).
The input and outputs are what the tests compare the converted model with. `REFUSED` models go
to `refused/`: real files that the converter must refuse, their outputs kept to show why.

Names after the folder remake only those fixtures (every case is still built, in order, so each
one's weights and input are the same whichever are written):

    /tmp/tfv/bin/python scripts/make_keras_tcn_fixtures.py tests/model/fixtures/keras_tcn \
        noskips_sigmoid
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CASES = {
    # name: (TCN(...) keyword arguments, Dense head units or None, Dense activation)
    "skips_relu": (dict(nb_filters=8, kernel_size=3, dilations=[1, 2, 4]), 2, "linear"),
    "noskips_tanh_stacks": (
        dict(nb_filters=6, kernel_size=2, nb_stacks=2, dilations=[1, 2],
             use_skip_connections=False, activation="tanh"),
        None, None,
    ),
    "skips_gelu_batchnorm_last": (
        dict(nb_filters=8, kernel_size=3, dilations=[1, 2, 4, 8], activation="gelu",
             use_batch_norm=True, return_sequences=False),
        3, "sigmoid",
    ),
    "skips_tanh_layernorm": (
        dict(nb_filters=6, kernel_size=3, dilations=[1, 2, 4], activation="tanh",
             use_layer_norm=True),
        2, "linear",
    ),
    "widths_elu": (
        dict(nb_filters=[4, 6, 6], kernel_size=3, dilations=[1, 2, 4],
             use_skip_connections=False, activation="elu"),
        1, "linear",
    ),
    # New cases go last: the input of each comes from one generator shared in this order.
    "noskips_sigmoid": (
        dict(nb_filters=4, kernel_size=3, dilations=[1, 2], use_skip_connections=False,
             activation="sigmoid"),
        2, "tanh",
    ),
    "skips_selu_logsoftmax": (
        dict(nb_filters=4, kernel_size=2, dilations=[1, 2, 4], activation="selu"),
        3, "log_softmax",
    ),
    # A Keras layer as the activation: torch's slope, saved as the layer's class and config.
    "skips_leakyrelu_layer": (
        dict(nb_filters=4, kernel_size=3, dilations=[1, 2, 4],
             activation=lambda keras: keras.layers.LeakyReLU(negative_slope=0.01)),
        2, "linear",
    ),
    # Keras' leaky_relu (negative slope 0.2); the same shapes as skips_leakyrelu_layer.
    "skips_leaky_relu": (
        dict(nb_filters=4, kernel_size=3, dilations=[1, 2, 4], activation="leaky_relu"),
        2, "linear",
    ),
}  # fmt: skip
REFUSED: dict = {}


def main(out: Path, only: set[str]) -> None:
    import keras
    import tcn

    unknown = only - set(CASES) - set(REFUSED)
    if unknown:
        raise SystemExit(f"no such case: {', '.join(sorted(unknown))}")
    rng = np.random.default_rng(0)
    cases = [(out, c) for c in CASES.items()] + [(out / "refused", c) for c in REFUSED.items()]
    for folder, (name, (kwargs, units, head_activation)) in cases:
        keras.utils.set_random_seed(len(name))
        inputs = keras.Input(shape=(None, 3))
        kwargs = {k: v(keras) if callable(v) else v for k, v in kwargs.items()}
        x = tcn.TCN(name="tcn", **{"return_sequences": True, **kwargs})(inputs)
        if units is not None:
            x = keras.layers.Dense(units, activation=head_activation)(x)
        model = keras.Model(inputs, x)
        for layer in model.layers:  # norms far from their initial (1, 0) and (0, 1)
            for sub in getattr(layer, "_flatten_layers", lambda: [])():
                if isinstance(sub, keras.layers.BatchNormalization):
                    mean, var = sub.moving_mean, sub.moving_variance
                    mean.assign(rng.normal(size=mean.shape).astype("float32"))
                    var.assign(rng.uniform(0.2, 3.0, size=var.shape).astype("float32"))
                if isinstance(sub, keras.layers.LayerNormalization):
                    sub.gamma.assign(rng.uniform(0.5, 1.5, size=sub.gamma.shape).astype("float32"))
                    sub.beta.assign(rng.normal(size=sub.beta.shape).astype("float32"))
        x_in = rng.normal(size=(1, 70, 3)).astype("float32")
        y = np.asarray(model(x_in, training=False))
        if only and name not in only:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / f"{name}.keras")
        np.savez(folder / f"{name}.npz", x=x_in, y=y)
        print(folder / name, y.shape)


if __name__ == "__main__":
    main(Path(sys.argv[1]), set(sys.argv[2:]))
