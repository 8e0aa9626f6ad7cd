"""NVIDIA's tritonclient (HTTP), unmodified, against a real uvicorn server on loopback: health,
metadata, inference with binary and JSON tensors, a sequence with start and end, refusals."""

from __future__ import annotations

import itertools

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http  # a dev dependency (pyproject): never skipped
from tritonclient.utils import InferenceServerException

from service.app import create_app
from tests.service.conftest import (
    assert_rows_close,
    random_rows,
    uvicorn_thread,
)

KEY = "triton-client-key-0123456789"


def auth() -> dict[str, str]:
    """The key's header, a new dict each call: tritonclient adds its own headers to it."""
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def triton(make_settings, clock):
    """(tritonclient for a keyed server, that server's base url)."""
    app = create_app(make_settings(api_keys=[KEY]), clock=clock)
    with uvicorn_thread(app) as (url, _):
        client = tritonclient_http.InferenceServerClient(url.removeprefix("http://"))
        try:
            yield client, url, app
        finally:
            client.close()


def inputs_of(x: np.ndarray, binary: bool = True) -> list:
    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return [tensor]


def v1_predict(url: str, x: np.ndarray) -> list:
    r = httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": x.tolist()}, headers=auth())
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def rows(length: int, seed: int) -> np.ndarray:
    return np.asarray(random_rows(length, seed), dtype=np.float32)


def test_health_and_metadata(triton):
    client, _, _ = triton
    assert client.is_server_live()  # the probes need no key
    assert client.is_server_ready()
    assert client.is_model_ready("tiny", headers=auth())
    assert client.is_model_ready("tiny", "1", headers=auth())
    assert not client.is_model_ready("tiny", "2", headers=auth())
    server = client.get_server_metadata(headers=auth())
    assert server["name"] == "tcnserve" and "sequence" in server["extensions"]
    model = client.get_model_metadata("tiny", headers=auth())
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 2]}]
    assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, -1, 2]}]
    with pytest.raises(InferenceServerException, match="API key") as raised:
        client.get_model_metadata("tiny")
    assert raised.value.status() == "401"
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.get_model_metadata("nope", headers=auth())
    config = client.get_model_config("tiny", headers=auth())
    assert config["sequence_batching"] and config["input"][0]["dims"] == [-1, 2]
    index = client.get_model_repository_index(headers=auth())
    assert index == [{"name": "tiny", "version": "1", "state": "READY"}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_v1_predict(triton, binary):
    client, url, _ = triton
    x = np.stack([rows(12, 1), rows(12, 2)])  # (2, 12, 2)
    outputs = [tritonclient_http.InferRequestedOutput("output", binary_data=binary)]
    result = client.infer(
        "tiny", inputs_of(x, binary), outputs=outputs, request_id="r-7", headers=auth()
    )
    assert result.get_response()["id"] == "r-7"
    y = result.as_numpy("output")
    assert y.dtype == np.float32 and y.shape == (2, 12, 2)
    assert_rows_close(y.tolist(), v1_predict(url, x))
    # No `outputs`: tritonclient asks for binary outputs (binary_data_output).
    y = client.infer("tiny", inputs_of(x), model_version="1", headers=auth()).as_numpy("output")
    assert_rows_close(y.tolist(), v1_predict(url, x))


def test_a_sequence_with_start_and_end_equals_predict(triton):
    client, url, _ = triton
    x = rows(50, 3)
    bounds = [0, 1, 2, 10, 11, 37, 50]
    got = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        result = client.infer(
            "tiny",
            inputs_of(x[None, a:b]),
            sequence_id=1234,
            sequence_start=i == 0,
            sequence_end=b == len(x),
            headers=auth(),
        )
        got.append(result.as_numpy("output")[0])
    assert_rows_close(np.concatenate(got).tolist(), v1_predict(url, x[None])[0])
    with pytest.raises(InferenceServerException, match="sequence 1234 has ended") as raised:
        client.infer("tiny", inputs_of(x[None, :1]), sequence_id=1234, headers=auth())
    assert raised.value.status() == "400"


def test_bad_tensors_are_refused_and_change_nothing(triton):
    client, url, _ = triton
    x = rows(8, 4)
    first = client.infer(
        "tiny", inputs_of(x[None, :4]), sequence_id="abc", sequence_start=True, headers=auth()
    ).as_numpy("output")[0]
    wrong_dtype = tritonclient_http.InferInput("input", [1, 4, 2], "FP64")
    wrong_dtype.set_data_from_numpy(x[None, 4:].astype(np.float64))
    wrong_shape = tritonclient_http.InferInput("input", [1, 4, 3], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 4, 3), np.float32))
    wrong_size = inputs_of(x[None, 4:])[0].set_shape([1, 5, 2])  # 40 bytes declared, 32 sent
    for tensor, message in [
        (wrong_dtype, "datatype must be FP32"),
        (wrong_shape, r"shape must be \[batch, time, 2\]"),
        (wrong_size, "binary_data_size is 32 bytes"),
    ]:
        with pytest.raises(InferenceServerException, match=message) as raised:
            client.infer("tiny", [tensor], sequence_id="abc", headers=auth())
        assert raised.value.status() == "400"
    r = httpx.get(f"{url}/v1/sessions/oip-str-abc", headers=auth())  # the sequence's session
    assert r.json()["position"] == 4
    rest = client.infer(
        "tiny", inputs_of(x[None, 4:]), sequence_id="abc", sequence_end=True, headers=auth()
    ).as_numpy("output")[0]
    assert_rows_close(np.concatenate([first, rest]).tolist(), v1_predict(url, x[None])[0])


def test_unknown_and_expired_sequences_say_which(triton, clock):
    client, _, _ = triton
    x = rows(2, 5)
    with pytest.raises(InferenceServerException, match="unknown sequence 77") as raised:
        client.infer("tiny", inputs_of(x[None, :1]), sequence_id=77, headers=auth())
    assert raised.value.status() == "400"
    client.infer(
        "tiny", inputs_of(x[None, :1]), sequence_id=78, sequence_start=True, headers=auth()
    )
    clock.advance(10_000)  # past the session TTL (600 s)
    with pytest.raises(InferenceServerException, match="sequence 78 expired") as raised:
        client.infer("tiny", inputs_of(x[None, 1:]), sequence_id=78, headers=auth())
    assert raised.value.status() == "400"


def test_sequence_offset_makes_a_retry_exactly_once(triton):
    client, url, _ = triton
    x = rows(6, 6)

    def push(a: int, b: int, **kwargs):
        return client.infer(
            "tiny",
            inputs_of(x[None, a:b]),
            sequence_id=55,
            parameters={"sequence_offset": a},
            headers=auth(),
            **kwargs,
        )

    push(0, 3, sequence_start=True)
    first = push(3, 6)
    retry = push(3, 6)  # the answer was lost, say: sent again, answered again, applied once
    np.testing.assert_array_equal(first.as_numpy("output"), retry.as_numpy("output"))
    assert retry.get_response()["parameters"]["sequence_position"] == 6
    r = httpx.get(f"{url}/v1/sessions/oip-int-55", headers=auth())
    assert r.json()["position"] == 6
    with pytest.raises(InferenceServerException, match="position 6") as raised:
        push(2, 5)
    assert raised.value.status() == "409"


def test_inference_statistics_follow_the_metrics(triton):
    client, url, _ = triton
    before = client.get_inference_statistics("tiny", headers=auth())["model_stats"]
    assert [(m["name"], m["version"], m["inference_count"]) for m in before] == [("tiny", "1", 0)]
    x = rows(50, 4)
    for i, (a, b) in enumerate(itertools.pairwise([0, 1, 20, 50])):
        client.infer(
            "tiny", inputs_of(x[None, a:b]), sequence_id=77, sequence_start=i == 0,
            headers=auth(),
        )  # fmt: skip
    (after,) = client.get_inference_statistics("tiny", "1", headers=auth())["model_stats"]
    assert after["inference_count"] == 50  # timesteps, the unit a streaming model infers
    stats = after["inference_stats"]
    assert 1 <= after["execution_count"] == stats["compute_infer"]["count"] <= 3
    assert stats["success"]["count"] == after["execution_count"]
    assert stats["success"]["ns"] >= stats["compute_infer"]["ns"] > 0
    assert stats["fail"] == {"count": 0, "ns": 0}  # not measured per model: docs/oip.md
    every = client.get_inference_statistics(headers=auth())["model_stats"]
    assert [m["name"] for m in every] == ["tiny"]
    assert httpx.get(f"{url}/v2/models/tiny/stats").status_code == 401
    for path in ("nope/stats", "tiny/versions/2/stats"):
        r = httpx.get(f"{url}/v2/models/{path}", headers=auth())
        assert r.status_code == 404 and "error" in r.json(), r.text
