"""The gRPC clients' cases, run by tests/service/test_grpc.py in a pytest process of their own
(the reason is there): NVIDIA's tritonclient.grpc, unmodified, against a real server (uvicorn
with the gRPC edge beside it), and KServe's InferenceGRPCClient in a subprocess. Run them alone
with `pytest tests/service/grpc_clients.py`."""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.grpc import oip_pb2 as pb
from service.grpc.server import SERVICE
from tests.service.conftest import (
    assert_rows_close,
    free_port,
    random_rows,
    serve_process,
    uvicorn_thread,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
KEY, OTHER_KEY = "grpc-client-key-0123456789", "grpc-other-key-0123456789"


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def served(make_settings):
    """(tritonclient.grpc client, gRPC address, HTTP url) of a keyed server."""
    port = free_port()
    settings = make_settings(api_keys=[KEY, OTHER_KEY], grpc_port=port, max_body_bytes=64 * 1024)
    with uvicorn_thread(create_app(settings)) as (url, _):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            yield client, f"127.0.0.1:{port}", url
        finally:
            client.close()


def inputs_of(x: np.ndarray) -> list:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def rows(length: int, seed: int) -> np.ndarray:
    return np.asarray(random_rows(length, seed), dtype=np.float32)


def predicted(url: str, x: np.ndarray) -> list:
    r = httpx.post(f"{url}/v1/models/tiny/predict", json={"inputs": x.tolist()}, headers=auth())
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def status_of(raised: pytest.ExceptionInfo) -> str:
    return str(raised.value.status())


def test_health_metadata_config_and_statistics(served):
    client, _, _ = served
    assert client.is_server_live() and client.is_server_ready()  # the probes need no key
    assert client.is_model_ready("tiny", headers=auth())
    assert client.is_model_ready("tiny", "1", headers=auth())
    meta = client.get_server_metadata(headers=auth(), as_json=True)
    assert meta["name"] == "tcnserve" and "sequence" in meta["extensions"]
    model = client.get_model_metadata("tiny", headers=auth(), as_json=True)
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "-1", "2"]}]
    config = client.get_model_config("tiny", headers=auth(), as_json=True)["config"]
    assert config["input"][0]["data_type"] == "TYPE_FP32" and "sequence_batching" in config
    index = client.get_model_repository_index(headers=auth(), as_json=True)
    assert index["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    stats = client.get_inference_statistics("tiny", headers=auth(), as_json=True)
    assert stats["model_stats"][0]["name"] == "tiny"


def test_infer_and_async_infer_equal_v1_predict(served):
    client, _, url = served
    x = np.stack([rows(9, 1), rows(9, 2)])
    want = predicted(url, x)
    got = client.infer("tiny", inputs_of(x), headers=auth(), request_id="r-1")
    assert got.get_response().id == "r-1"
    assert_rows_close(got.as_numpy("output").tolist(), want)
    answers: queue.Queue = queue.Queue()
    client.async_infer(
        "tiny", inputs_of(x), lambda result, error: answers.put((result, error)), headers=auth()
    )
    result, error = answers.get(timeout=30)
    assert error is None
    assert_rows_close(result.as_numpy("output").tolist(), want)


def test_typed_contents_are_read_as_raw_bytes_are(served):
    """tritonclient sends raw bytes; other clients send the protocol's typed lists."""
    _, address, url = served
    x = rows(6, 3)[None]
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = call(request, metadata=tuple(auth().items()))
        y = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(response.outputs[0].shape)
        assert_rows_close(y.tolist(), predicted(url, x))
        request.inputs[0].contents.fp32_contents.pop()
        with pytest.raises(grpc.RpcError) as raised:
            call(request, metadata=tuple(auth().items()))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fp32_contents has 11 values; shape [1, 6, 2] takes 12" in raised.value.details()


def test_refusals_have_the_matching_status_and_change_nothing(served):
    client, _, url = served
    x = rows(4, 5)[None]
    cases = [
        (lambda: client.infer("tiny", inputs_of(x)), "StatusCode.UNAUTHENTICATED"),
        (lambda: client.infer("nope", inputs_of(x), headers=auth()), "StatusCode.NOT_FOUND"),
        (
            lambda: client.infer("tiny", inputs_of(x), model_version="2", headers=auth()),
            "StatusCode.NOT_FOUND",
        ),
        (
            lambda: client.infer(
                "tiny", inputs_of(np.zeros((1, 4, 3), np.float32)), headers=auth()
            ),
            "StatusCode.INVALID_ARGUMENT",
        ),
        (
            lambda: client.infer("tiny", inputs_of(x), sequence_id=7, headers=auth()),
            "StatusCode.NOT_FOUND",  # an unknown sequence: open it with sequence_start
        ),
        (
            lambda: client.infer(
                "tiny", inputs_of(np.zeros((1, 9000, 2), np.float32)), headers=auth()
            ),
            "StatusCode.RESOURCE_EXHAUSTED",  # over max_body_bytes: refused before any work
        ),
        (
            lambda: client.infer(
                "tiny", inputs_of(np.full((1, 2, 2), np.nan, np.float32)), headers=auth()
            ),
            "StatusCode.INVALID_ARGUMENT",
        ),
    ]
    for call, status in cases:
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert status_of(raised) == status, raised.value.message()
    (stats,) = client.get_inference_statistics("tiny", headers=auth(), as_json=True)["model_stats"]
    assert stats.get("inference_count", "0") == "0"  # nothing ran
    page = httpx.get(f"{url}/metrics").text
    for line in (
        'tcnserve_grpc_requests_total{code="UNAUTHENTICATED",method="ModelInfer"} 1.0',
        'tcnserve_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"} 2.0',
        'tcnserve_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"} 3.0',
    ):
        assert line in page, line


def test_a_sequence_over_one_stream_equals_predict_and_errors_leave_it_open(served):
    client, _, url = served
    x = rows(40, 6)
    bounds = [0, 1, 3, 10, 11, 27, 40]
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)), headers=auth())
    try:
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            if i == 2:  # a bad request in the middle: an error on the stream, which goes on
                client.async_stream_infer(
                    "tiny", inputs_of(np.zeros((1, 2, 3), np.float32)), request_id="bad",
                    sequence_id=99, sequence_start=False,
                )  # fmt: skip
            client.async_stream_infer(
                "tiny", inputs_of(x[None, a:b]), request_id=str(i), sequence_id=99,
                sequence_start=i == 0, sequence_end=b == len(x),
            )  # fmt: skip
        got, errors = {}, []
        for _ in range(len(bounds)):  # every chunk, and the bad request's error
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error.message())
            else:
                got[result.get_response().id] = result.as_numpy("output")[0]
    finally:
        client.stop_stream()
    assert errors == ["input: shape must be [batch, time, 2], got [1, 2, 3]"]
    outputs = np.concatenate([got[str(i)] for i in range(len(bounds) - 1)])
    assert_rows_close(outputs.tolist(), predicted(url, x[None])[0])


def test_sequences_interleaved_on_one_stream_keep_their_order(served):
    client, _, url = served
    xs = {seq: rows(30, seed) for seq, seed in ((1, 7), ("sensor 7/b", 8), (3, 9))}
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)), headers=auth())
    try:
        for t in range(0, 30, 3):
            for seq, x in xs.items():
                client.async_stream_infer(
                    "tiny", inputs_of(x[None, t : t + 3]), request_id=f"{seq}@{t}",
                    sequence_id=seq, sequence_start=t == 0, sequence_end=t == 27,
                )  # fmt: skip
        got = {}
        for _ in range(30):
            result, error = answers.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            got[response.id] = (result.as_numpy("output")[0], response.parameters)
    finally:
        client.stop_stream()
    for seq, x in xs.items():
        outputs = np.concatenate([got[f"{seq}@{t}"][0] for t in range(0, 30, 3)])
        assert_rows_close(outputs.tolist(), predicted(url, x[None])[0])
        assert got[f"{seq}@27"][1]["sequence_position"].int64_param == 30


def test_a_retry_with_its_offset_is_answered_again_and_keys_are_isolated(served):
    client, _, _ = served
    x = rows(8, 10)
    first = client.infer("tiny", inputs_of(x[None, :4]), sequence_id=5, sequence_start=True,
                         headers=auth())  # fmt: skip
    second = client.infer("tiny", inputs_of(x[None, 4:]), sequence_id=5,
                          parameters={"sequence_offset": 4}, headers=auth())  # fmt: skip
    again = client.infer("tiny", inputs_of(x[None, 4:]), sequence_id=5,
                         parameters={"sequence_offset": 4}, headers=auth())  # fmt: skip
    assert np.array_equal(second.as_numpy("output"), again.as_numpy("output"))  # exactly once
    with pytest.raises(InferenceServerException) as raised:  # another key's sequence 5
        client.infer("tiny", inputs_of(x[None, 4:]), sequence_id=5, headers=auth(OTHER_KEY))
    assert status_of(raised) == "StatusCode.NOT_FOUND"
    other = client.infer("tiny", inputs_of(x[None, :4]), sequence_id=5, sequence_start=True,
                         headers=auth(OTHER_KEY))  # fmt: skip
    assert np.array_equal(other.as_numpy("output"), first.as_numpy("output"))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tiny", inputs_of(x[None, 4:]), sequence_id=5,
                     parameters={"sequence_offset": 3}, headers=auth())  # fmt: skip
    assert status_of(raised) == "StatusCode.ABORTED"  # an offset conflict


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(address, key, x):
    headers = (("authorization", f"Bearer {key}"),)
    client = InferenceGRPCClient(address, timeout=30, retries=0)
    live = await client.is_server_live()
    ready = await client.is_server_ready()
    model_ready = await client.is_model_ready("tiny", headers=headers)
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    response = await client.infer(InferRequest("tiny", [tensor], request_id="k"), headers=headers)
    out = response.outputs[0].as_numpy()
    typed = InferInput("input", list(x.shape), "FP32")
    typed.set_data_from_numpy(x, binary_data=False)  # KServe's default: fp32_contents
    again = await client.infer(InferRequest("tiny", [typed]), headers=headers)
    assert np.array_equal(again.outputs[0].as_numpy(), out)
    await client.close()
    print(json.dumps({"flags": [live, ready, model_ready], "id": response.id,
                      "outputs": out.tolist()}))

x = np.asarray(json.loads(sys.argv[3]), dtype=np.float32)
asyncio.run(main(sys.argv[1], sys.argv[2], x))
"""


def test_kserve_grpc_client(served):
    _, address, url = served
    x = rows(7, 11)[None]
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KSERVE_CLIENT), address, KEY, str(x.tolist())],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["flags"] == [True, True, True] and answer["id"] == "k"
    assert_rows_close(answer["outputs"], predicted(url, x))


@pytest.mark.slow
def test_every_edge_process_serves_grpc_and_sigterm_ends_the_streams(tiny_dir, tmp_path):
    """`tcnserve serve --workers 2 --grpc-port`: each edge binds the port (SO_REUSEPORT), any
    connection continues any sequence, and SIGTERM ends an open stream instead of hanging."""
    port = free_port()
    args = ["--model", f"tiny={tiny_dir}", "--device", "cpu", "--workers", "2"]
    env = {"TCNSERVE_API_KEYS": KEY, "TCNSERVE_GRPC_PORT": str(port)}
    with serve_process(args, tmp_path / "server.log", env) as (url, process):
        x = rows(24, 12)
        got = []
        for i, t in enumerate(range(0, 24, 3)):  # a new connection for every request
            with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
                wait_until(lambda c=client: c.is_server_ready(), "this edge's gRPC ready")
                result = client.infer(
                    "tiny", inputs_of(x[None, t : t + 3]), sequence_id="across edges",
                    sequence_start=i == 0, headers=auth(),
                )  # fmt: skip
                got.append(result.as_numpy("output")[0])
        assert_rows_close(np.concatenate(got).tolist(), predicted(url, x[None])[0])
        answers: queue.Queue = queue.Queue()
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        client.start_stream(lambda result, error: answers.put((result, error)), headers=auth())
        client.async_stream_infer("tiny", inputs_of(x[None, :2]), sequence_id=8,
                                  sequence_start=True)  # fmt: skip
        assert answers.get(timeout=30)[1] is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0  # an open stream does not hold the server up
        client.stop_stream()
        client.close()


def test_a_deadline_shorter_than_the_call_ends_it(served):
    client, _, _ = served
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tiny", inputs_of(rows(2000, 13)[None]), headers=auth(), client_timeout=1e-4)
    assert status_of(raised) == "StatusCode.DEADLINE_EXCEEDED"
