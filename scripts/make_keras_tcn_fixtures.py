"""Build the keras-tcn fixtures of tests/model/test_keras_tcn.py with real keras-tcn.

keras-tcn imports TensorFlow, which tcnserve never needs: run this in a venv of its own,

    python3 -m venv /tmp/tfv && /tmp/tfv/bin/pip install "tensorflow-cpu<2.20" "keras-tcn==3.5.*"
    /tmp/tfv/bin/python scripts/make_keras_tcn_fixtures.py tests/model/fixtures/keras_tcn

Each fixture is a saved `.keras` model (random weights, seeded) and `<name>.npz` holding a
random input `x` (1, T, C) and the model's own output `y` on it (`model(x)`, inference mode).
The input and outputs are what the tests compare the converted model with.
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
}  # fmt: skip


def main(out: Path) -> None:
    import keras
    import tcn

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (kwargs, units, head_activation) in CASES.items():
        keras.utils.set_random_seed(len(name))
        inputs = keras.Input(shape=(None, 3))
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
        model.save(out / f"{name}.keras")
        np.savez(out / f"{name}.npz", x=x_in, y=y)
        print(name, y.shape)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
