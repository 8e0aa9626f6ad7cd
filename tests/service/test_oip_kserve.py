"""KServe's Python SDK (InferenceRESTClient, protocol v2), unmodified, against a real uvicorn
server on loopback: health, model readiness, inference with JSON and binary tensors, and a
sequence pushed request by request, equal to /predict."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from service.app import create_app
from tests.service.conftest import assert_rows_close, random_rows, uvicorn_thread

KEY = "kserve-client-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def kserve_url(make_settings):
    with uvicorn_thread(create_app(make_settings(api_keys=[KEY]))) as (url, _):
        yield url


def run(coro_fn):
    """Each test's calls on one fresh client, closed at the end (the SDK is asyncio)."""

    async def main():
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            return await coro_fn(client)
        finally:
            await client.close()

    return asyncio.run(main())


def tensor(x: np.ndarray, binary: bool) -> InferInput:
    t = InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def predict(url: str, x: np.ndarray) -> list:
    r = httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": x.tolist()}, headers=HEADERS)
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_health_and_model_readiness(kserve_url):
    async def calls(client):
        return (
            await client.is_server_live(kserve_url),
            await client.is_server_ready(kserve_url),
            await client.is_model_ready(kserve_url, "tiny", headers=HEADERS),
        )

    assert run(calls) == (True, True, True)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_predict(kserve_url, binary):
    x = np.asarray([random_rows(9, seed=1), random_rows(9, seed=2)], dtype=np.float32)

    async def calls(client):
        request = InferRequest(model_name="tiny", infer_inputs=[tensor(x, binary)])
        return await client.infer(kserve_url, request, model_name="tiny", headers=dict(HEADERS))

    response = run(calls)
    (output,) = response.outputs
    assert output.name == "output" and output.shape == [2, 9, 2]
    assert_rows_close(output.as_numpy().reshape(2, 9, 2).tolist(), predict(kserve_url, x))


def test_a_sequence_request_by_request_equals_predict(kserve_url):
    rows = np.asarray(random_rows(12, seed=3), dtype=np.float32)
    chunks = [rows[:1], rows[1:5], rows[5:6], rows[6:]]

    async def calls(client):
        outs = []
        for i, chunk in enumerate(chunks):
            parameters = {"sequence_id": "kserve sensor/7", "sequence_start": i == 0,
                          "sequence_end": i == len(chunks) - 1}  # fmt: skip
            request = InferRequest(
                model_name="tiny", infer_inputs=[tensor(chunk[None], True)], parameters=parameters
            )
            response = await client.infer(
                kserve_url, request, model_name="tiny", headers=dict(HEADERS)
            )
            outs += response.outputs[0].as_numpy().reshape(-1, 2).tolist()
        return outs

    assert_rows_close(run(calls), predict(kserve_url, rows[None])[0])


def test_a_refusal_reaches_the_sdk_as_its_status_error(kserve_url):
    x = np.zeros((1, 3, 5), dtype=np.float32)  # five channels: the model takes two

    async def calls(client):
        request = InferRequest(model_name="tiny", infer_inputs=[tensor(x, False)])
        with pytest.raises(httpx.HTTPStatusError, match="shape must be") as refused:
            await client.infer(kserve_url, request, model_name="tiny", headers=dict(HEADERS))
        return refused.value.response.status_code

    assert run(calls) == 400
