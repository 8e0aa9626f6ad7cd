"""Decode validated JSON rows into arrays for one model, raising InvalidInput at the edge."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model import TCNConfig
from service.errors import InvalidInput, TooManyTimesteps


def decode_rows(
    rows: Sequence[Sequence[float]], config: TCNConfig, dtype: np.dtype, what: str
) -> np.ndarray:
    """T rows -> (T, in_channels) floats, or (T,) int64 token ids for an embedding model.

    An embedding model takes one integer token id per row: `[[3], [1], ...]`.
    """
    if config.vocab_size is not None:
        return _decode_tokens(rows, config.vocab_size, what)
    width = config.in_channels
    for t, row in enumerate(rows):
        if len(row) != width:
            raise InvalidInput(
                f"{what}: row {t} has {len(row)} values; this model takes {width} per timestep"
            )
    with np.errstate(over="ignore"):
        array = np.asarray(rows, dtype=dtype).reshape(len(rows), width)  # (T, C)
    if not np.isfinite(array).all():  # e.g. 1e308 overflowing float32
        raise InvalidInput(f"{what}: values must be finite in the model's dtype")
    return array


def check_array(x: np.ndarray, config: TCNConfig, dtype: np.dtype, what: str) -> np.ndarray:
    """Already-decoded (T, in_channels) rows (a binary frame): width, finiteness, dtype."""
    if config.vocab_size is not None:
        raise InvalidInput(
            f"{what}: binary frames carry float32 rows; this model takes token ids, so send "
            "text frames"
        )
    if x.ndim != 2 or x.shape[1] != config.in_channels or len(x) == 0:
        raise InvalidInput(
            f"{what}: expected rows of {config.in_channels} values, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what}: values must be finite (no NaN or Inf)")
    return x.astype(dtype, copy=False)


def _decode_tokens(rows: Sequence[Sequence[float]], vocab_size: int, what: str) -> np.ndarray:
    ids = []
    for t, row in enumerate(rows):
        if len(row) != 1 or not float(row[0]).is_integer():
            raise InvalidInput(f"{what}: row {t} must be one integer token id, like [3]")
        token = int(row[0])
        if not 0 <= token < vocab_size:
            raise InvalidInput(f"{what}: row {t}: token id {token} is outside [0, {vocab_size})")
        ids.append(token)
    return np.asarray(ids, dtype=np.int64)  # (T,)


def check_timesteps(total: int, limit: int) -> None:
    """Refuse requests whose rows, summed over sequences, exceed max_timesteps_per_request."""
    if total > limit:
        raise TooManyTimesteps(
            f"the request has {total} timesteps; at most {limit} per request "
            "(max_timesteps_per_request): split it into several requests"
        )
