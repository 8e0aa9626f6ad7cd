"""Session bookkeeping: the bounded memory of expired ids."""

from __future__ import annotations

from service.sessions.state import RecentIds


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
