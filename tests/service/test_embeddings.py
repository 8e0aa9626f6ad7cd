"""Conditioned models (pytorch-tcn's embedding_shapes): each session, and each /predict
sequence, carries its own embedding, and every path gives what the full forward gives with it.

Sessions take `embedding` when they open (POST /v1/sessions), keep it in their snapshots and
store records, and a conditioned model refuses a session or a sequence without one (never zeros)."""

from __future__ import annotations

import functools

import httpx
import numpy as np
import pytest
import torch

from model import TCNConfig, load_model
from service.app import create_app
from service.sessions.record import SessionRecord
from tests.service.conftest import (
    assert_rows_close,
    random_rows,
    serve_process,
    serving,
    uvicorn_thread,
    write_model,
)

CONDITIONED = {
    "add": TCNConfig(
        in_channels=2, channels=[8, 8], kernel_size=3, out_channels=1, embedding_dims=(3, 2)
    ),
    "concat": TCNConfig(
        in_channels=2,
        channels=[6, 8],
        kernel_size=2,
        out_channels=2,
        embedding_dims=(4,),
        embedding_mode="concat",
        layer_norm=True,
    ),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return {
        name: write_model(tmp_path_factory.mktemp(name), config, seed=7)
        for name, config in CONDITIONED.items()
    }


@pytest.fixture
def settings(make_settings, model_dirs, tiny_dir):
    return make_settings(models={"tiny": tiny_dir, **model_dirs})


def full_forward(directory, rows: list, embedding: list) -> np.ndarray:
    net = load_model(directory).eval()
    x = torch.tensor([rows], dtype=torch.float32).transpose(1, 2)  # (1, C, T)
    e = torch.tensor([embedding], dtype=torch.float32)  # (1, E)
    with torch.no_grad():
        return net(x, embeddings=e)[0].T.numpy()  # (T, out)


@pytest.mark.parametrize("name", list(CONDITIONED))
def test_a_session_streams_what_the_full_forward_gives_with_its_embedding(
    name, settings, model_dirs
):
    rng = np.random.default_rng(0)
    rows = random_rows(23, seed=3)
    embeddings = [rng.normal(size=CONDITIONED[name].embedding_width).tolist() for _ in range(2)]
    with serving(create_app(settings)) as c:
        sids = []
        for e in embeddings:
            r = c.post("/v1/sessions", json={"model": name, "embedding": e, "prefix": rows[:4]})
            assert r.status_code == 201, r.text
            sids.append(r.json()["session_id"])
        outputs: list[list] = [[], []]
        for start, end in ((4, 5), (5, 12), (12, 13), (13, 23)):  # interleaved chunks
            for i, sid in enumerate(sids):
                r = c.post(f"/v1/sessions/{sid}/steps", json={"inputs": rows[start:end]})
                assert r.status_code == 200, r.text
                outputs[i] += r.json()["outputs"]
        for i, e in enumerate(embeddings):
            assert_rows_close(outputs[i], full_forward(model_dirs[name], rows, e)[4:].tolist())
        # /v1/steps advances both in one request, each on its own embedding
        more = random_rows(2, seed=4)
        body = {"steps": [{"session_id": s, "inputs": more} for s in sids]}
        results = c.post("/v1/steps", json=body).json()["results"]
        for i, e in enumerate(embeddings):
            expected = full_forward(model_dirs[name], rows + more, e)[23:]
            assert_rows_close(results[i]["outputs"], expected.tolist())


def test_predict_takes_one_embedding_per_sequence(settings, model_dirs):
    sequences = [random_rows(9, seed=5), random_rows(4, seed=6)]
    embeddings = [[0.5, -1.0, 0.25, 2.0, 0.0], [1.0, 1.0, -0.5, 0.0, 0.3]]
    with serving(create_app(settings)) as c:
        body = {"inputs": sequences, "embeddings": embeddings}
        r = c.post("/v1/models/add/predict", json=body)
        assert r.status_code == 200, r.text
        for seq, e, out in zip(sequences, embeddings, r.json()["outputs"], strict=True):
            assert_rows_close(out, full_forward(model_dirs["add"], seq, e).tolist())


def test_a_missing_or_wrong_embedding_is_refused_and_changes_nothing(settings):
    rows = random_rows(3, seed=8)
    with serving(create_app(settings)) as c:
        cases = [
            ("add", None, "conditioned on an embedding of 5 values"),
            ("add", [1.0, 2.0], "an embedding is 5 numbers"),
            ("add", [0.5] * 100_000, "an embedding is 5 numbers"),  # refused at its 6th value
            ("add", [1.0, 2.0, 3.0, 4.0, "5"], "Expected `float`"),
            ("tiny", [1.0], "takes no embedding"),
        ]
        for model, embedding, says in cases:
            body = {"model": model, "embedding": embedding}
            r = c.post("/v1/sessions", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "invalid_input" and says in r.text, r.text
        assert c.get("/v1/sessions").json()["sessions"] == []
        too_large = {"model": "add", "embedding": [1e38] * 5}
        r = c.post("/v1/sessions", json=too_large)
        assert r.status_code == 422 and "largest magnitude" in r.text, r.text
        assert c.get("/v1/sessions").json()["sessions"] == []  # no session, no slot taken
        body = {"inputs": [rows], "embeddings": [[1e38] * 5]}
        r = c.post("/v1/models/add/predict", json=body)  # held to the same bound as at open
        assert r.status_code == 422 and "largest magnitude" in r.text, r.text
        r = c.post("/v1/models/add/predict", json={"inputs": [rows]})
        assert r.status_code == 422 and "conditioned on an embedding" in r.text
        r = c.post("/v1/models/add/predict", json={"inputs": [rows], "embeddings": []})
        assert r.status_code == 422 and "one per sequence" in r.text
        r = c.post("/v1/models/tiny/predict", json={"inputs": [rows], "embeddings": [[1.0]]})
        assert r.status_code == 422 and "takes no embedding" in r.text
        tensor = {"name": "input", "shape": [1, 3, 2], "datatype": "FP32"}
        tensor["data"] = np.ravel(rows).tolist()
        r = c.post("/v2/models/add/infer", json={"inputs": [tensor]})
        assert r.status_code == 400 and "/v2 and gRPC requests carry none" in r.text, r.text
        info = c.get("/v1/models/concat").json()
        assert info["embedding_dims"] == [4] and info["embedding_mode"] == "concat"
        assert c.get("/v1/models/tiny").json()["embedding_dims"] is None


def test_a_snapshot_carries_the_embedding_and_rebuilds_the_session_exactly(settings, model_dirs):
    rows = random_rows(15, seed=9)
    e = [0.1, -0.2, 0.3, 0.4, -0.5]
    with serving(create_app(settings)) as c:
        sid = c.post("/v1/sessions", json={"model": "add", "embedding": e, "prefix": rows[:10]})
        sid = sid.json()["session_id"]
        snap = c.get(f"/v1/sessions/{sid}/snapshot").json()
        assert snap["embedding"] == e
        r = c.post("/v1/sessions", json={"model": "add", "snapshot": snap})
        assert r.status_code == 201, r.text
        copy = r.json()["session_id"]
        out = c.post(f"/v1/sessions/{copy}/steps", json={"inputs": rows[10:]}).json()["outputs"]
        assert_rows_close(out, full_forward(model_dirs["add"], rows, e)[10:].tolist())
        other = {"model": "add", "snapshot": snap, "embedding": [0.0] * 5}
        assert c.post("/v1/sessions", json=other).status_code == 422


def test_a_session_record_keeps_the_embedding_exactly():
    e = np.array([0.1, 1 / 3, -2.5e-7], dtype=np.float64)
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    record = SessionRecord("add", 60.0, 3, rows, embedding=e)
    back = SessionRecord.decode(record.encode())
    assert back.embedding is not None and back.embedding.tobytes() == e.tobytes()
    assert SessionRecord.decode(SessionRecord("m", 1.0, 0, rows[:0]).encode()).embedding is None


def test_the_client_opens_predicts_and_restores_with_embeddings(settings, model_dirs):
    from service.client import Client

    rows = random_rows(12, seed=10)
    e = np.array([0.3, 0.2, 0.1, -0.1, 0.5])
    expected = full_forward(model_dirs["add"], rows, e.tolist())
    with uvicorn_thread(create_app(settings)) as (url, _), Client(url) as client:
        out = client.predict("add", [rows], embeddings=[e])[0]
        np.testing.assert_allclose(out, expected, atol=1e-5)
        with client.open_session("add", embedding=[e[:3], e[3:]]) as session:  # one per entry
            first = session.push(rows[:6])
            # The server loses it (a restart, an expired TTL): the client rebuilds it, with
            # its embedding, from the inputs it kept.
            assert httpx.delete(f"{url}/v1/sessions/{session.id}").status_code == 204
            rest = session.push(rows[6:])
        np.testing.assert_allclose(np.vstack([first, rest]), expected, atol=1e-5)


@pytest.mark.slow
def test_conditioned_sessions_across_edge_processes(model_dirs, tmp_path):
    """With --workers 2 the embedding crosses the engine boundary (service/engine/messages.py)."""
    rows = random_rows(10, seed=11)
    e = [0.2, -0.4, 0.6, 0.8]
    args = ["--workers", "2", "--model", f"concat={model_dirs['concat']}"]
    with serve_process(args, tmp_path / "serve.log") as (url, _):
        r = httpx.post(f"{url}/v1/sessions", json={"model": "concat", "embedding": e})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        outs = []
        for i in range(0, 10, 3):
            pushed = httpx.post(f"{url}/v1/sessions/{sid}/steps", json={"inputs": rows[i : i + 3]})
            assert pushed.status_code == 200, pushed.text
            outs += pushed.json()["outputs"]
        assert_rows_close(outs, full_forward(model_dirs["concat"], rows, e).tolist())
        snap = httpx.get(f"{url}/v1/sessions/{sid}/snapshot").json()
        assert snap["embedding"] == e
        r = httpx.post(
            f"{url}/v1/models/concat/predict", json={"inputs": [rows], "embeddings": [e]}
        )
        assert_rows_close(
            r.json()["outputs"][0], full_forward(model_dirs["concat"], rows, e).tolist()
        )


@pytest.mark.asyncio
async def test_a_conditioned_session_moves_between_replicas_with_its_embedding(
    make_settings, store, model_dirs, tiny_dir
):
    """Through the session store (in-process and Redis): the record carries the embedding, so
    the replica that takes the session over continues it exactly."""
    from tests.service.test_durability import replicas

    rows = random_rows(30, seed=12)
    e = [0.7, -0.1, 0.4, 0.0, 1.2]
    settings = functools.partial(make_settings, models={"tiny": tiny_dir, **model_dirs})
    async with replicas(settings, store) as (a, b):
        body = {"model": "add", "embedding": e, "prefix": rows[:5]}
        r = await a.post("/v1/sessions", json=body)
        sid, outputs = r.json()["session_id"], r.json()["outputs"]
        for client, start, stop in ((a, 5, 12), (b, 12, 20), (a, 20, 30)):  # handed off twice
            r = await client.post(
                f"/v1/sessions/{sid}/steps", json={"inputs": rows[start:stop], "offset": start}
            )
            assert r.status_code == 200, r.text
            outputs += r.json()["outputs"]
        assert_rows_close(outputs, full_forward(model_dirs["add"], rows, e).tolist())
        assert (await b.get(f"/v1/sessions/{sid}/snapshot")).json()["embedding"] == e
