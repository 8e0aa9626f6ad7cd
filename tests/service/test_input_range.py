"""The range check of decoded rows: the same verdicts on its small-array path (a streamed row or
two, checked in Python) and its large one (two numpy reductions)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.models.inputs import _FEW_VALUES, InputSpec, check_array
from service.protocol.errors import InvalidInput

BOUND = 1e6
SPEC = InputSpec(width=2, vocab_size=None, dtype=np.dtype(np.float32), max_abs=BOUND)
ROWS = [1, _FEW_VALUES // 2, _FEW_VALUES // 2 + 1, 40]  # both sides of the small path's limit


@pytest.mark.parametrize("rows", ROWS)
def test_rows_within_the_bound_pass_unchanged(rows: int) -> None:
    x = np.random.default_rng(rows).uniform(-BOUND, BOUND, (rows, 2)).astype(np.float32)
    x[-1] = [BOUND, -BOUND]  # the bound itself is allowed
    assert check_array(x, SPEC, "inputs") is x


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "finite"), (np.inf, "finite"), (-np.inf, "finite"), (2 * BOUND, "beyond +-1e+06")],
)
def test_a_bad_value_anywhere_is_refused(rows: int, value: float, message: str) -> None:
    rng = np.random.default_rng(rows)
    for _ in range(5):
        x = rng.uniform(-1, 1, (rows, 2)).astype(np.float32)
        t, c = int(rng.integers(rows)), int(rng.integers(2))
        x[t, c] = value
        with pytest.raises(InvalidInput, match=re.escape(message)) as caught:
            check_array(x, SPEC, "inputs")
        if message.startswith("beyond"):
            assert f"row {t} " in str(caught.value)


# The items of POST /v1/steps are decoded together (`rows_many`): whatever they hold, each item
# ends exactly as `rows` alone would decode it, array or error.
ITEM_TEXTS = [
    "[[0.5, -0.25]]",
    "[[1, 2], [3, 4]]",
    "[[1e6, -1e6]]",  # the bound itself
    "[[2e6, 0]]",  # beyond it
    "[[1e999, 0]]",  # Inf once parsed
    "[[0.5, 0.5, 0.5]]",  # too wide
    "[]",  # no row
    "[[0.5]]",
    '[["a", 1]]',
    "[[1, 2], [3, 4], [5, 6], [7, 8]]",  # more than the test's max_rows
    "{}",
]


def _as_raw(text: str):
    import msgspec

    return msgspec.json.decode(f'{{"x": {text}}}'.encode(), type=dict[str, msgspec.Raw])["x"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ITEM_TEXTS), min_size=0, max_size=8), st.booleans())
def test_items_decoded_together_end_as_each_decoded_alone(texts: list[str], bounded: bool):
    from service.models.inputs import rows, rows_many
    from service.protocol.errors import ServiceError

    max_rows = 3 if bounded else None
    raws = [_as_raw(t) for t in texts]
    together = rows_many(raws, SPEC, "inputs", max_rows)
    assert len(together) == len(raws)
    for raw, got in zip(raws, together, strict=True):
        try:
            want = rows(raw, SPEC, "inputs", max_rows=max_rows)
        except ServiceError as e:
            assert isinstance(got, ServiceError), (bytes(raw), got)
            assert (type(got), str(got)) == (type(e), str(e))
        else:
            assert isinstance(got, np.ndarray), (bytes(raw), got)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
