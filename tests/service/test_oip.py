"""The Open Inference Protocol (/v2) against the ASGI app: metadata, health, JSON and binary
tensors, the sequence extension mapped onto sessions, and refusals that change nothing."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from service.app import create_app
from service.models.inputs import InputSpec
from service.oip import decode as oip
from service.protocol.limits import RequestLimits
from tests.service.conftest import (
    assert_rows_close,
    predict,
    random_rows,
    runtime_of,
    serving,
)

KEY = "oip-test-key-0123456789"


def tensor(x: np.ndarray, nested: bool = False) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}


def infer(client, x: np.ndarray, model: str = "tiny", **body):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": [tensor(x)], **body})


def step(client, sequence_id, x: np.ndarray, **parameters):
    """One sequence request of rows x (T, C); the response."""
    body = {"parameters": {"sequence_id": sequence_id, **parameters}, "inputs": [tensor(x[None])]}
    return client.post("/v2/models/tiny/infer", json=body)


def outputs_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["name"] == "output" and out["datatype"] == "FP32"
    return np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])


def binary_body(x: np.ndarray, **request) -> tuple[bytes, dict]:
    raw = x.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        **request,
    }
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def rows(length: int, seed: int) -> np.ndarray:
    return np.asarray(random_rows(length, seed), dtype=np.float32)  # (T, 2)


def session_position(client, session_id: str) -> int:
    r = client.get(f"/v1/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return r.json()["position"]


# ----- metadata and health ----------------------------------------------------------------------


def test_server_metadata_and_health(client):
    assert client.get("/v2").json() == {
        "name": "tcnserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "sequence", "statistics"],
    }
    # The bodies the OIP text defines, and the status codes (200 true, 4xx false) beside them.
    for path, body in (
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/tiny/ready", {"name": "tiny", "ready": True}),
        ("/v2/models/tiny/versions/1/ready", {"name": "tiny", "ready": True}),
    ):
        r = client.get(path)
        assert (r.status_code, r.json()) == (200, body), path


def test_draining_is_not_ready(client):
    runtime_of(client.app).start_draining()
    r = client.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (400, {"ready": False})
    r = client.get("/v2/models/tiny/ready")
    assert (r.status_code, r.json()) == (400, {"name": "tiny", "ready": False})
    assert client.get("/v2/health/live").json() == {"live": True}


def test_model_metadata_float_and_token_models(make_settings, tiny_dir, tokens_dir):
    settings = make_settings(models={"tiny": tiny_dir, "tokens": tokens_dir})
    with serving(create_app(settings)) as client:
        assert client.get("/v2/models/tiny").json() == {
            "name": "tiny",
            "versions": ["1"],
            "platform": "tcnserve_pytorch",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 2]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, -1, 2]}],
        }
        tokens = client.get("/v2/models/tokens/versions/1").json()
        assert tokens["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1, -1]}]
        ids = [3, 0, 6, 2, 5]
        body = {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "INT64", "data": ids}]}
        got = outputs_of(client.post("/v2/models/tokens/infer", json=body))
        want = predict(client, [[[i] for i in ids]], model="tokens")
        assert_rows_close(got[0].tolist(), want[0])
        raw = np.asarray(ids, dtype="<i8").tobytes()
        binary = {"name": "input", "shape": [1, 5], "datatype": "INT64"}
        binary["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [binary]}).encode()
        length = {"Inference-Header-Content-Length": str(len(head))}
        r = client.post("/v2/models/tokens/infer", content=head + raw, headers=length)
        assert_rows_close(outputs_of(r)[0].tolist(), want[0])
        bad = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "INT64", "data": [1, 7]}]}
        r = client.post("/v2/models/tokens/infer", json=bad)
        assert r.status_code == 400 and "outside [0, 7)" in r.json()["error"]


def test_unknown_model_or_version_is_404_in_the_protocols_form(client):
    for path in ("/v2/models/nope", "/v2/models/tiny/versions/2", "/v2/models/nope/ready"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert isinstance(r.json()["error"], str)
    r = client.post("/v2/models/nope/infer", json={"inputs": [tensor(rows(2, 1)[None])]})
    assert r.status_code == 404 and "no model named 'nope'" in r.json()["error"]
    r = client.get("/v2/models/nope/config")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


# ----- inference without a sequence -------------------------------------------------------------


def test_json_infer_equals_v1_predict_flat_or_nested(client):
    x = np.stack([rows(7, 1), rows(7, 2)])  # (2, 7, 2): a batch of two sequences
    want = predict(client, x.tolist())
    flat = infer(client, x, id="req-1")
    assert flat.json()["id"] == "req-1" and flat.json()["model_name"] == "tiny"
    assert_rows_close(outputs_of(flat).tolist(), want)
    nested = client.post("/v2/models/tiny/infer", json={"inputs": [tensor(x, nested=True)]})
    assert_rows_close(outputs_of(nested).tolist(), want)


def test_binary_tensors_both_ways(client):
    x = rows(9, 3)[None]
    want = np.asarray(predict(client, x.tolist()), dtype=np.float32)
    body, headers = binary_body(x)  # no `outputs`, no binary_data_output: JSON answer
    r = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert_rows_close(outputs_of(r).tolist(), want.tolist())
    body, headers = binary_body(x, parameters={"binary_data_output": True})
    r = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    (out,) = head["outputs"]
    assert out["parameters"]["binary_data_size"] == want.nbytes == len(r.content) - n
    got = np.frombuffer(r.content[n:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_outputs_selection(client):
    x = rows(4, 4)[None]
    asked = infer(client, x, outputs=[{"name": "output", "parameters": {"binary_data": True}}])
    assert asked.headers["content-type"] == "application/octet-stream"
    json_out = infer(
        client,
        x,
        parameters={"binary_data_output": True},
        outputs=[{"name": "output", "parameters": {"binary_data": False}}],
    )
    assert json_out.headers["content-type"] == "application/json"
    assert infer(client, x, outputs=[]).json()["outputs"] == []
    r = infer(client, x, outputs=[{"name": "logits"}])
    assert r.status_code == 400 and "one output, 'output'" in r.json()["error"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"datatype": "FP64"}, "datatype must be FP32"),
        ({"shape": [1, 3, 3], "data": [0.0] * 9}, "shape must be [batch, time, 2]"),
        ({"shape": [1, 0, 2], "data": []}, "every dimension"),
        ({"data": [0.0] * 5}, "expected the 6 numbers"),
        ({"data": [0.0] * 5 + ["1"]}, "numbers only"),
        ({"data": [0.0] * 5 + [True]}, "numbers only"),
        ({"data": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}, "nested like the shape"),
        ({"data": [0.0] * 5 + [1e37]}, "beyond"),
        ({"data": [0.0] * 5 + [1e300]}, "must be finite"),
        ({"name": "x"}, "one tensor named 'input'"),
        ({"parameters": {"shared_memory_region": "r"}}, "shared-memory extensions"),
        ({"parameters": {"binary_data_size": 24}, "data": None}, "Inference-Header-Content"),
        ({"parameters": {"binary_data_size": 24}}, "data or binary_data_size, not both"),
    ],
)
def test_bad_tensors_are_400_and_change_nothing(client, change, message):
    x = rows(6, 5)
    assert step(client, 11, x[:3], sequence_start=True).status_code == 200
    bad = {**tensor(x[None, 3:]), **change}
    body = {"parameters": {"sequence_id": 11}, "inputs": [bad]}
    r = client.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert session_position(client, "oip-int-11") == 3
    got = np.concatenate([outputs_of(step(client, 11, x[:3], sequence_start=True))[0],
                          outputs_of(step(client, 11, x[3:], sequence_end=True))[0]])  # fmt: skip
    assert_rows_close(got.tolist(), predict(client, [x.tolist()])[0])


def test_bad_binary_bodies_are_400(client):
    x = rows(3, 6)[None]
    body, headers = binary_body(x)
    post = client.post
    for extra, message in [
        ({"Inference-Header-Content-Length": "0"}, "Inference-Header-Content-Length"),
        ({"Inference-Header-Content-Length": str(len(body) + 1)}, "Inference-Header"),
        ({"Inference-Header-Content-Length": "12x"}, "Inference-Header"),
    ]:
        r = post("/v2/models/tiny/infer", content=body, headers=extra)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    r = post("/v2/models/tiny/infer", content=body + b"\0\0\0\0", headers=headers)
    assert r.status_code == 400 and "binary_data_size says 24" in r.json()["error"]
    r = post("/v2/models/tiny/infer", content=body[:-4], headers=headers)
    assert r.status_code == 400 and "binary_data_size says 24" in r.json()["error"]
    head = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    head["inputs"][0]["parameters"]["binary_data_size"] = 20
    text = json.dumps(head).encode()
    r = post("/v2/models/tiny/infer", content=text + body[-24:-4],
             headers={"Inference-Header-Content-Length": str(len(text))})  # fmt: skip
    assert r.status_code == 400 and "takes 24" in r.json()["error"]
    nan = x.copy()
    nan[0, 1, 0] = np.nan
    body, headers = binary_body(nan)
    r = post("/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 400 and "finite" in r.json()["error"]


def test_malformed_requests_are_400(client):
    x = rows(2, 7)[None]
    for body, message in [
        (b"{", "truncated"),
        (b"[]", "Expected `object`"),
        (json.dumps({"inputs": [tensor(x)], "extra": 1}).encode(), "unknown field `extra`"),
        (json.dumps({"inputs": [tensor(x)], "parameters": {"foo": 1}}).encode(), "`foo`"),
        (json.dumps({"inputs": [tensor(x)], "parameters": {"sequence_start": True}}).encode(),
         "need a sequence_id"),
        (json.dumps({"inputs": [tensor(x)], "parameters": {"sequence_id": "é" * 600}}).encode(),
         "at most 1024 bytes"),
        (json.dumps({"inputs": [tensor(x)], "model_name": "other"}).encode(),
         "model_name 'other' in the body differs from the path's 'tiny'"),
        (json.dumps({"inputs": [tensor(x)], "model_version": "2"}).encode(),
         "model_version '2'"),
        (json.dumps({"inputs": [tensor(x)], "parameters": {"sequence_id": True}}).encode(),
         "sequence_id"),
        (json.dumps({"inputs": [tensor(np.stack([x[0], x[0]]))],
                     "parameters": {"sequence_id": 3}}).encode(), "one sequence"),
    ]:  # fmt: skip
        r = client.post("/v2/models/tiny/infer", content=body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    r = client.post("/v2/models/tiny/infer", content=b"{}", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "Content-Encoding" in r.json()["error"]


def test_limits_apply_as_on_v1(make_settings):
    settings = make_settings(max_timesteps_per_request=30, max_sequences_per_request=2)
    with serving(create_app(settings)) as client:
        r = infer(client, np.zeros((2, 16, 2), np.float32))
        assert r.status_code == 413 and "max_timesteps_per_request" in r.json()["error"]
        r = infer(client, np.zeros((3, 1, 2), np.float32))
        assert r.status_code == 413 and "max_sequences_per_request" in r.json()["error"]
        # A declared shape is refused before its data is read: no allocation for it.
        huge = {"name": "input", "shape": [1, 10**12, 2], "datatype": "FP32", "data": [0.0]}
        r = client.post("/v2/models/tiny/infer", json={"inputs": [huge]})
        assert r.status_code == 413


# ----- sequences -------------------------------------------------------------------------------


def test_a_sequence_streams_like_predict_on_one_session(client):
    x = rows(40, 8)
    chunks = [x[:1], x[1:9], x[9:10], x[10:33], x[33:]]
    got = []
    for i, chunk in enumerate(chunks):
        flags = {"sequence_start": i == 0, "sequence_end": i == len(chunks) - 1}
        r = step(client, "sensor-7", chunk, **flags)
        got.append(outputs_of(r)[0])
        if i == 0:  # the sequence is an ordinary session, visible on /v1
            assert session_position(client, "oip-str-sensor-7") == 1
        assert r.json()["parameters"]["sequence_position"] == sum(len(c) for c in chunks[: i + 1])
    assert_rows_close(np.concatenate(got).tolist(), predict(client, [x.tolist()])[0])
    assert client.get("/v1/sessions/oip-str-sensor-7").status_code == 404  # ended: closed


def test_any_string_is_a_sequence_id_hashed_into_its_own_session(client):
    import hashlib

    x = rows(6, 11)
    odd, plain = "sensor a/b ü #3", "sensor-a"
    hashed = f"oip-strh-{hashlib.sha256(odd.encode()).hexdigest()[:40]}"
    got = [outputs_of(step(client, odd, x[:2], sequence_start=True))[0]]
    assert step(client, plain, x[:1], sequence_start=True).status_code == 200  # apart
    assert session_position(client, hashed) == 2
    got.append(outputs_of(step(client, odd, x[2:]))[0])
    assert_rows_close(np.concatenate(got).tolist(), predict(client, [x.tolist()])[0])
    assert session_position(client, "oip-str-sensor-a") == 1


def test_the_body_may_repeat_the_paths_model_and_version(client):
    x = rows(3, 12)
    body = {"inputs": [tensor(x[None])], "model_name": "tiny", "model_version": "1"}
    for path in ("/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer"):
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        assert_rows_close(outputs_of(r)[0].tolist(), predict(client, [x.tolist()])[0])


def test_model_config_list_and_repository_index(make_settings, tiny_dir, tokens_dir):
    settings = make_settings(models={"tiny": tiny_dir, "tokens": tokens_dir})
    with serving(create_app(settings)) as client:
        config = client.get("/v2/models/tiny/config").json()
        assert config["max_batch_size"] == settings.max_sequences_per_request
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 2]}]
        assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1, 2]}]
        idle = config["sequence_batching"]["max_sequence_idle_microseconds"]
        assert idle == settings.session_ttl_s * 1_000_000
        assert client.get("/v2/models/tiny/versions/1/config").json() == config
        assert client.get("/v2/models/tokens/config").json()["input"][0]["dims"] == [-1]
        assert client.get("/v2/models/tiny/versions/2/config").status_code == 404
        assert client.get("/v2/models").json() == {
            "models": [
                {"name": n, "versions": ["1"], "platform": "tcnserve_pytorch", "ready": True}
                for n in ("tiny", "tokens")
            ]
        }
        assert client.post("/v2/repository/index").json() == [
            {"name": n, "version": "1", "state": "READY"} for n in ("tiny", "tokens")
        ]


def test_unknown_ended_and_expired_sequences_say_which(client, clock):
    x = rows(3, 9)
    r = step(client, 99, x[:1])
    assert r.status_code == 400 and r.json()["error"].startswith("unknown sequence 99")
    assert step(client, 5, x[:1], sequence_start=True, sequence_end=True).status_code == 200
    r = step(client, 5, x[1:2])
    assert r.status_code == 400 and "sequence 5 has ended" in r.json()["error"]
    assert step(client, 6, x[:1], sequence_start=True).status_code == 200
    clock.advance(10_000)  # past the 600 s TTL
    r = step(client, 6, x[1:2])
    assert r.status_code == 400 and "sequence 6 expired" in r.json()["error"]
    assert step(client, 6, x[:1], sequence_start=True).status_code == 200  # starts afresh


def test_offsets_make_retries_exactly_once(client):
    x = rows(6, 10)
    first = step(client, 21, x[:2], sequence_start=True)
    again = step(client, 21, x[:2], sequence_start=True)  # a retried start: its answer again
    np.testing.assert_array_equal(outputs_of(first), outputs_of(again))
    assert session_position(client, "oip-int-21") == 2
    pushed = step(client, 21, x[2:4], sequence_offset=2)
    retried = step(client, 21, x[2:4], sequence_offset=2)
    np.testing.assert_array_equal(outputs_of(pushed), outputs_of(retried))
    assert retried.json()["parameters"]["sequence_position"] == 4
    r = step(client, 21, x[4:6], sequence_offset=3)
    assert r.status_code == 409 and "position 4" in r.json()["error"]
    r = step(client, 21, x[3:5], sequence_start=True)  # not a retry of the start
    assert r.status_code == 409 and "already open" in r.json()["error"]
    assert session_position(client, "oip-int-21") == 4


def test_x_session_id_must_name_the_sequences_session(client):
    # Behind deploy/'s consistent-hash proxy, a sequence's requests carry its session id as
    # X-Session-ID; one that names another session would have been routed elsewhere.
    body = {
        "parameters": {"sequence_id": 8, "sequence_start": True},
        "inputs": [tensor(rows(1, 1)[None])],
    }
    r = client.post("/v2/models/tiny/infer", json=body, headers={"X-Session-ID": "oip-int-9"})
    assert r.status_code == 400 and "send that id as X-Session-ID" in r.json()["error"]
    r = client.post("/v2/models/tiny/infer", json=body, headers={"X-Session-ID": "oip-int-8"})
    assert r.status_code == 200


def test_a_sequence_stays_on_its_model(make_settings, tiny_dir):
    settings = make_settings(models={"tiny": tiny_dir, "other": tiny_dir})
    with serving(create_app(settings)) as client:
        assert step(client, 1, rows(1, 1), sequence_start=True).status_code == 200
        body = {"parameters": {"sequence_id": 1}, "inputs": [tensor(rows(1, 2)[None])]}
        r = client.post("/v2/models/other/infer", json=body)
        assert r.status_code == 400 and "open on model 'tiny'" in r.json()["error"]


def test_capacity_and_quota_are_429(make_settings):
    with serving(create_app(make_settings(max_sessions=1))) as client:
        assert step(client, 1, rows(1, 1), sequence_start=True).status_code == 200
        r = step(client, 2, rows(1, 1), sequence_start=True)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "session slots" in r.json()["error"]


# ----- authentication and the protocol's error form ---------------------------------------------


def test_api_keys_apply_to_v2_but_not_its_health_probes(make_settings):
    with serving(create_app(make_settings(api_keys=[KEY]))) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        for path in ("/v2", "/v2/models/tiny", "/v2/models/tiny/ready"):
            r = client.get(path)
            assert r.status_code == 401, path
            assert "Authorization: Bearer <key>" in r.json()["error"]
        r = infer(client, rows(2, 1)[None])
        assert r.status_code == 401
        r = client.get("/v2/models/tiny", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        r = client.post(
            "/v2/models/tiny/infer",
            json={"inputs": [tensor(rows(2, 1)[None])]},
            headers={"X-API-Key": KEY},
        )
        assert r.status_code == 200


def test_the_open_health_probes_take_no_body(make_settings):
    # Open to anyone even with keys on, so, as /healthz, they refuse a body at its first KiB.
    with serving(create_app(make_settings(api_keys=[KEY]))) as client:
        r = client.post("/v2/health/live", content=b"x" * 4096)
        assert r.status_code == 413 and "takes no request body" in r.json()["error"]


def test_body_limit_applies_in_the_protocols_form(make_settings):
    with serving(create_app(make_settings(max_body_bytes=2048))) as client:
        r = infer(client, rows(200, 1)[None])
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
        # /v1 keeps its own form
        r = client.post("/v1/models/tiny/predict", json={"inputs": [random_rows(200, 1)]})
        assert r.json()["error"]["code"] == "body_too_large"


# ----- memory ----------------------------------------------------------------------------------

T = 500_000
WORST_FLAT = b'{"inputs":[{"name":"input","shape":[1,%d,2],"datatype":"FP32","data":[' % T
WORST_NESTED = b'{"inputs":[{"name":"input","shape":[1,%d,2],"datatype":"FP32","data":[[' % T


ORDINARY = np.random.default_rng(0).random((1, T // 5, 2))
BINARY, BINARY_HEADER = binary_body(ORDINARY)
MANY_INPUTS = b'{"inputs":[' + b",".join([b'{"name":"a","shape":[],"datatype":""}'] * T) + b"]}"


@pytest.mark.parametrize(
    ("body", "header", "factor"),
    [
        (WORST_FLAT + b",".join([b"0"] * (2 * T)) + b"]}]}", None, 4),  # 2 bytes a number
        (WORST_NESTED + b",".join([b"[0,1]"] * T) + b"]]}]}", None, 4),
        (json.dumps({"inputs": [tensor(ORDINARY)]}).encode(), None, 2.5),
        (BINARY, BINARY_HEADER["Inference-Header-Content-Length"], 1.5),
        (b'{"inputs":[{"name":"input","shape":[' + b",".join([b"123456"] * T) + b"]}]}", None, 6),
        (MANY_INPUTS, None, 8),
    ],
    ids=["flat-zeros", "nested-zeros", "ordinary", "binary", "long-shape", "many-inputs"],
)
def test_decoding_costs_a_small_multiple_of_the_body(body, header, factor):
    """Peak memory traced while decoding (numpy's arrays included): a few times the body."""
    spec = InputSpec(2, None, np.dtype(np.float32), 1e30)
    limits = RequestLimits(max_timesteps=10 * T, max_sequences=8)
    tracemalloc.start()
    try:
        try:
            oip.decode_request(body, header, spec, limits, "tiny")
        except Exception as e:  # the hostile ones are refused; the cost is what is measured
            assert "length <= 8" in str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < factor * len(body), peak / len(body)


def test_one_string_sequence_id_is_a_sequence_of_each_key_never_shared(make_settings):
    other = "oip-other-key-0123456789"
    x = rows(5, 13)
    with serving(create_app(make_settings(api_keys=[KEY, other]))) as client:
        mine, theirs = ({"X-API-Key": k} for k in (KEY, other))
        client.headers.update(mine)
        assert step(client, "shared name", x[:3], sequence_start=True).status_code == 200
        client.headers.update(theirs)
        r = step(client, "shared name", x[3:])
        assert r.status_code == 400 and "unknown sequence 'shared name'" in r.json()["error"]
        assert step(client, "shared name", x[:1], sequence_start=True).status_code == 200
        client.headers.update(mine)
        got = outputs_of(step(client, "shared name", x[3:]))[0]  # the first key's, at 3
        assert_rows_close(got.tolist(), predict(client, [x.tolist()])[0][3:])
