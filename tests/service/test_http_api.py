"""The HTTP surface: probes, models, /predict, error bodies, request ids, body limits, docs."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from fastapi import Request
from fastapi.testclient import TestClient

from model import load_model
from service.app import create_app
from service.http.middleware import is_api_path
from tests.service.conftest import (
    TINY,
    assert_rows_close,
    predict,
    random_rows,
    runtime_of,
    serving,
    write_model,
)


def test_probes_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny"]
    info = client.get("/v1/models/tiny").json()
    assert info["receptive_field"] == TINY.receptive_field == 29
    assert info["in_channels"] == 2 and info["out_channels"] == 2
    assert info["channels"] == [6, 6, 5] and info["dilations"] == [1, 2, 4]
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["trained"] is False and info["task"] == "test"


def test_models_report_metadata_and_evaluation(tmp_path, make_settings):
    directory = write_model(
        tmp_path / "m", TINY, seed=3, metadata={"task": "adding", "trained": True}
    )
    (directory / "metrics.json").write_text(json.dumps({"test_mse": 0.0012}))
    with serving(create_app(make_settings(models={"adding": directory}))) as c:
        info = c.get("/v1/models/adding").json()
    assert info["trained"] is True and info["task"] == "adding"
    assert info["evaluation"] == {"test_mse": 0.0012}


def test_builtin_default_model_is_served_and_says_so():
    from service.settings import Settings, default_model_dir

    settings = Settings()
    assert settings.models == {"default": default_model_dir()}
    with serving(create_app(Settings(max_sessions=2))) as c:
        info = c.get("/v1/models/default").json()
        assert "trained" in info and info["metadata"]
        out = predict(c, [[[0.5, 1.0], [0.2, 0.0]]], model="default")
    assert len(out[0]) == 2


def test_predict_matches_forward_for_ragged_batches(client, tiny_dir):
    net = load_model(tiny_dir)
    seqs = [random_rows(n, seed=n) for n in (1, 7, 40, 3, 40)]
    outputs = predict(client, seqs)
    last = predict(client, seqs, outputs="last")
    for seq, out, tail in zip(seqs, outputs, last, strict=True):
        expected = net(torch.tensor(seq).T[None])[0].T  # (1, C, T) -> (T, out)
        assert_rows_close(out, expected.tolist())
        assert_rows_close(tail, expected[-1:].tolist())


@pytest.mark.parametrize(
    "options",
    [
        {"activation": "gelu"},
        {"activation": "tanh"},
        {"activation": "selu", "skip_connections": True},
        {"activation": "elu", "skip_connections": True, "gate": True},
        {"activation": "relu", "layer_norm": True, "gate": True},
    ],
    ids=repr,
)
def test_a_model_with_other_options_streams_and_predicts_its_forward(
    tmp_path, make_settings, options
):
    import dataclasses

    directory = write_model(tmp_path / "m", dataclasses.replace(TINY, **options), 5)
    activation = options["activation"]
    net = load_model(directory)
    rows = random_rows(30, seed=5)
    expected = net(torch.tensor(rows).T[None])[0].T.tolist()
    with serving(create_app(make_settings(models={"m": directory}))) as c:
        assert c.get("/v1/models/m").json()["activation"] == activation
        assert_rows_close(predict(c, [rows], model="m")[0], expected)
        sid = c.post("/v1/sessions", json={"model": "m"}).json()["session_id"]
        outs = []
        for chunk in (rows[:1], rows[1:11], rows[11:12], rows[12:]):
            outs += c.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk}).json()["outputs"]
        assert_rows_close(outs, expected)


def test_predict_token_model(make_settings, tokens_dir):
    net = load_model(tokens_dir)
    with serving(create_app(make_settings(models={"tok": tokens_dir}))) as c:
        out = predict(c, [[[1], [6], [0], [3]]], model="tok")
        bad = c.post("/v1/models/tok/predict", json={"inputs": [[[7]]]})
        frac = c.post("/v1/models/tok/predict", json={"inputs": [[[1.5]]]})
        info = c.get("/v1/models/tok").json()
        created = c.post("/v1/sessions", json={"model": "tok", "prefix": [[1]]}).json()
        url = f"/v1/sessions/{created['session_id']}/steps"
        streamed = created["outputs"] + c.post(url, json={"inputs": [[6]]}).json()["outputs"]
        streamed += c.post(url, json={"inputs": [[0], [3]]}).json()["outputs"]
        assert c.post(url, json={"inputs": [[9]]}).status_code == 422
    expected = net(torch.tensor([[1, 6, 0, 3]]))[0].T
    assert_rows_close(out[0], expected.tolist())
    assert_rows_close(streamed, expected.tolist())
    assert bad.status_code == 422 and "outside [0, 7)" in bad.json()["error"]["message"]
    assert frac.status_code == 422
    assert info["input"] == "token_ids" and info["vocab_size"] == 7


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": []}, "at least one sequence"),
        ({"inputs": [[]]}, "inputs[0]: give at least one row"),
        ({"inputs": [[[1.0]]]}, "inputs[0][0]: Expected `array` of length 2 (each row is 2"),
        ({"inputs": [[[1.0, "2"]]]}, "inputs[0][0][1]: Expected `float`, got `str`"),
        ({"inputs": [[[1.0, True]]]}, "inputs[0][0][1]: Expected `float`, got `bool`"),
        ({"inputs": [[[1.0, 2.0]]], "outputs": "first"}, "outputs"),
        ({"inputs": [[[1.0, 2.0]]], "extra": 1}, "unknown field `extra`"),
        ({"inputs": [[[1.0, 1e300]]]}, "without overflowing"),
        ({"inputs": "rows"}, "inputs: Expected `array`, got `str`"),
        ({"inputs": [[[1.0, 2.0]]] * 2 + [[[1.0, 2.0, 3.0]]]}, "inputs[2][0]: Expected"),
    ],
)
def test_predict_rejects_bad_input(client, body, fragment):
    r = client.post("/v1/models/tiny/predict", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_input" and fragment in error["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_predict_rejects_nan_literals(client, literal):
    body = '{"inputs": [[[1.0, LITERAL]]]}'.replace("LITERAL", literal)
    r = client.post(
        "/v1/models/tiny/predict", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"]


def test_malformed_json_is_invalid_input(client):
    r = client.post(
        "/v1/models/tiny/predict", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


def test_unknown_model_and_route(client):
    r = client.post("/v1/models/nope/predict", json={"inputs": [[[1.0, 2.0]]]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/nope").status_code == 404
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_timestep_limit_is_413(make_settings):
    # 40 >= the tiny model's R - 1 = 28, so its snapshots stay restorable (else no start)
    with serving(create_app(make_settings(max_timesteps_per_request=40))) as c:
        r = c.post("/v1/models/tiny/predict", json={"inputs": [random_rows(21, 1)] * 2})
        ok = c.post("/v1/models/tiny/predict", json={"inputs": [random_rows(20, 1)] * 2})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_timesteps"
    assert ok.status_code == 200


def test_body_limit_by_length_and_by_stream(make_settings):
    with serving(create_app(make_settings(max_body_bytes=2048))) as c:
        big = {"inputs": [random_rows(200, 1)]}
        r = c.post("/v1/models/tiny/predict", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert r.headers["x-request-id"]

        def chunks():  # no Content-Length: the limit must count the streamed body
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i : i + 500]

        r = c.post(
            "/v1/models/tiny/predict",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert (
            c.post("/v1/models/tiny/predict", json={"inputs": [random_rows(5, 1)]}).status_code
            == 200
        )


def test_request_id_is_echoed_or_made(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    assert (
        client.get("/healthz", headers={"X-Request-ID": "bad id\t"}).headers["x-request-id"]
        != "bad id\t"
    )
    assert client.get("/v1/models/nope").headers["x-request-id"]


def test_unexpected_error_is_a_generic_500(client, monkeypatch):
    entry = runtime_of(client.app).registry.get("tiny")

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(entry, "info", boom)
    r = client.get("/v1/models/tiny", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal", "message": "internal server error"}}
    assert r.headers["x-request-id"] == "req-500"


def test_readyz_is_503_until_warmed_then_while_draining(make_settings):
    app = create_app(make_settings())
    entry = runtime_of(app).registry.get("tiny")
    gate = threading.Event()
    warm = entry.worker.warm

    async def slow_warm(rows) -> None:
        await asyncio.to_thread(gate.wait, 30)
        await warm(rows)

    entry.worker.warm = slow_warm  # type: ignore[method-assign]
    with serving_unloaded(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers["retry-after"]
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/sessions", json={"model": "tiny"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        gate.set()
        assert runtime_of(app).loaded.wait(30)
        assert c.get("/readyz").status_code == 200
        created = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        runtime_of(app).start_draining()
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        r = c.post("/v1/sessions", json={"model": "tiny"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        # Sessions already here keep working while the server drains.
        r = c.post(f"/v1/sessions/{created}/steps", json={"inputs": [[0.0, 1.0]]})
        assert r.status_code == 200


def serving_unloaded(app):
    """A TestClient that runs the lifespan without waiting for the models."""
    return TestClient(app)


def test_model_info_is_documented_field_for_field(client):
    from service.http.schemas import ModelInfo

    info = client.get("/v1/models/tiny").json()
    assert set(info) == set(ModelInfo.model_fields)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ModelInfo"]
    assert set(schema["properties"]) == set(info)


def test_docs_are_served_without_a_cdn(client):
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page).text
        assert "cdn." not in html and "unpkg" not in html, page
        src = next(p for p in html.split('"') if p.endswith(asset))
        r = client.get(src)
        assert r.status_code == 200 and len(r.content) > 10_000, src


def test_openapi_documents_the_api(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/models",
        "/v1/models/{name}",
        "/v1/models/{name}/predict",
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/steps",
        "/v1/sessions/{session_id}/reset",
    ):
        assert path in paths
    # Bodies are decoded by service/models/inputs.py; their schemas are documented inline, with
    # exactly the fields the decoder takes.
    from service.models import inputs

    for path, decoded in (
        ("/v1/models/{name}/predict", inputs.PredictBody),
        ("/v1/sessions", inputs.CreateBody),
        ("/v1/sessions/{session_id}/steps", inputs.StepBody),
    ):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["properties"]) == set(decoded.__struct_fields__), path
        assert "$ref" not in json.dumps(body)
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "503" in paths["/readyz"]["get"]["responses"]
    # The API-key schemes, on every /v1 operation (checked by ApiKeyMiddleware, not by a
    # dependency), and the answers of the lean routes, documented as for any other route.
    assert set(spec["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert ("security" in operation) == is_api_path(path), (method, path)
    for path in ("/v1/sessions/{session_id}/steps", "/v1/steps", "/v1/models/{name}/predict"):
        answer = paths[path]["post"]["responses"]["200"]["content"]["application/json"]
        assert answer["schema"]["$ref"].startswith("#/components/schemas/"), path


def test_dependency_overrides_reach_every_route(make_settings):
    from service.http.deps import Caller, get_caller

    app = create_app(make_settings())
    calls = []

    async def caller_for_tests(request: Request) -> Caller:
        calls.append(request.url.path)
        return await get_caller(request)

    app.dependency_overrides[get_caller] = caller_for_tests
    with serving(app) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 1.0]]}).status_code == 200
        assert c.get("/v1/models").status_code == 200
    assert calls == ["/v1/sessions", f"/v1/sessions/{sid}/steps", "/v1/models"]


def test_a_lean_route_refuses_endpoints_it_cannot_call():
    from fastapi import Header, Response

    from service.http.deps import CallerDep
    from service.http.routes.lean import LeanRoute

    async def takes_a_header(request: Request, caller: CallerDep, x_thing: str = Header()):
        return Response()

    async def takes_no_caller(session_id: str, request: Request) -> Response:
        return Response()

    for endpoint in (takes_a_header, takes_no_caller):
        with pytest.raises(TypeError, match="must take only path parameters"):
            LeanRoute("/v1/things/{session_id}", endpoint, methods=["POST"])


def test_metrics_are_exposed(client):
    predict(client, [random_rows(5, 1)])
    sid = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 1.0]]})
    text = client.get("/metrics").text
    for name in (
        "tcnserve_requests_total",
        "tcnserve_request_duration_seconds_bucket",
        "tcnserve_timesteps_total",
        "tcnserve_active_sessions",
        "tcnserve_sessions_created_total",
        "tcnserve_sessions_expired_total",
        "tcnserve_sessions_deleted_total",
        "tcnserve_step_batch_size_bucket",
        "tcnserve_batch_queue_delay_seconds_bucket",
        "tcnserve_model_compute_seconds_bucket",
    ):
        assert name in text, name
    assert sid not in text  # no session-id labels
    assert 'route="/v1/sessions/{session_id}/steps"' in text
