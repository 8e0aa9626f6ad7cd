"""Session bookkeeping: the kept input tail and the bounded memory of expired ids."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from service.session_state import RecentIds, keep_last


@given(
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    keep=st.integers(0, 20),
)
def test_keep_last_is_the_last_rows_of_everything_pushed(chunks, keep):
    rows = np.arange(sum(chunks) * 2, dtype=np.float32).reshape(-1, 2)
    tail, start = rows[:0], 0
    for size in chunks:
        tail = keep_last(tail, rows[start : start + size], keep)
        start += size
        expected = rows[max(0, start - keep) : start] if keep else rows[:0]
        np.testing.assert_array_equal(tail, expected)


def test_recent_ids_forget_the_oldest():
    ids = RecentIds(2)
    for key in (("k", "a"), ("k", "b"), ("k", "a"), ("k", "c")):
        ids.add(key)
    assert ("k", "a") in ids and ("k", "c") in ids and ("k", "b") not in ids
    ids.discard(("k", "a"))
    assert ("k", "a") not in ids and len(ids) == 1
    none = RecentIds(0)
    none.add(("k", "a"))
    assert len(none) == 0
