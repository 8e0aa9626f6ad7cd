"""The service on a CUDA device (skipped without a GPU; run on one with `pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

from service.app import create_app
from tests.service.conftest import assert_rows_close, predict, random_rows, serving

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("dtype", "cuda_graphs"), [("float32", False), ("bfloat16", False), ("float32", True)]
)
def test_sessions_on_cuda_equal_predict(make_settings, dtype, cuda_graphs):
    rows = random_rows(50, seed=31)
    atol = 1e-4 if dtype == "float32" else 5e-2
    settings = make_settings(device="cuda", dtype=dtype, cuda_graphs=cuda_graphs)
    with serving(create_app(settings)) as c:
        info = c.get("/v1/models/tiny").json()
        assert info["device"].startswith("cuda") and info["dtype"] == dtype
        created = c.post("/v1/sessions", json={"model": "tiny", "prefix": rows[:7]}).json()
        outputs = created["outputs"]
        for position in range(7, 50):
            r = c.post(
                f"/v1/sessions/{created['session_id']}/steps",
                json={"inputs": [rows[position]], "offset": position},
            )
            outputs += r.json()["outputs"]
        assert_rows_close(outputs, predict(c, [rows])[0], atol=atol)
