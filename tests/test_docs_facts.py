"""Facts the docs repeat from the code, checked against the code (the code is the one source)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_gives_the_chunked_push_threshold_the_pool_uses():
    from model.streaming import CHUNKED_PUSH_ROWS

    text = " ".join((ROOT / "README.md").read_text().split())
    assert f"up to `CHUNKED_PUSH_ROWS` ({CHUNKED_PUSH_ROWS}) rows a ragged advance" in text


def test_the_docs_give_how_long_the_server_waits_for_its_session_store():
    from service.store.durability import STORE_CONNECT_TIMEOUT_S, STORE_CONNECT_WARN_EVERY_S

    durability = " ".join((ROOT / "docs" / "durability.md").read_text().split())
    assert (
        f"waits up to {STORE_CONNECT_TIMEOUT_S:g} s for the store to answer (a store starting "
        f"beside it), saying so every {STORE_CONNECT_WARN_EVERY_S:g} s"
    ) in durability
    service = (ROOT / "docs" / "service.md").read_text()
    assert f"did not answer within {STORE_CONNECT_TIMEOUT_S:g} s of the start" in service


def test_the_training_docs_worked_example_prints_what_the_shipped_weights_give():
    import re

    import torch

    from model import load_model
    from model.tasks import adding_problem

    text = (ROOT / "docs" / "training.md").read_text()
    shown = {
        int(t): float(v)
        for t, v in re.findall(r"^t=\s*(\d+) marker=\d output=(-?[\d.]+)$", text, re.MULTILINE)
    }
    target = float(re.search(r"^target (-?[\d.]+)$", text, re.MULTILINE).group(1))
    x, y = adding_problem(1, 600, torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = load_model(ROOT / "service" / "default_model").eval()(x)[0, 0]
    assert len(shown) == 12 and round(y.item(), 4) == target
    far = {t: (v, out[t - 1].item()) for t, v in shown.items() if abs(out[t - 1] - v) > 6e-5}
    assert not far, far  # shown to 4 decimals
