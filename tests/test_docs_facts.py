"""Facts the docs repeat from the code, checked against the code (the code is the one source)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_gives_the_chunked_push_threshold_the_pool_uses():
    from model.streaming import CHUNKED_PUSH_ROWS

    text = " ".join((ROOT / "README.md").read_text().split())
    assert f"up to `CHUNKED_PUSH_ROWS` ({CHUNKED_PUSH_ROWS}) rows a ragged advance" in text
