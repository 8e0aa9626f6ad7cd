"""The range check of decoded rows: the same verdicts on its small-array path (a streamed row or
two, checked in Python) and its large one (two numpy reductions)."""

from __future__ import annotations

import re

import numpy as np
import pytest

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
