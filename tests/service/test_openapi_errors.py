"""The OpenAPI document lists, for each route, the errors it can answer and no others."""

from __future__ import annotations

from service.protocol import error_codes

# (method, path) -> the error statuses it documents. A route that reads no body cannot answer
# 413 or 422; only a create can answer 429 or 409 session_exists; /v2 answers bad requests 400.
EXPECTED = {
    ("get", "/v1/models"): {401, 503},
    ("get", "/v1/models/{name}"): {401, 404, 503},
    ("post", "/v1/models/{name}/predict"): {401, 404, 413, 422, 503},
    ("post", "/v1/sessions"): {401, 404, 409, 413, 422, 429, 503},
    ("post", "/v1/sessions/{session_id}/steps"): {401, 404, 409, 410, 413, 422, 503},
    ("get", "/v1/sessions/{session_id}"): {401, 404, 410, 503},
    ("get", "/v1/sessions/{session_id}/snapshot"): {401, 404, 410, 503},
    ("post", "/v1/sessions/{session_id}/reset"): {401, 404, 410, 503},
    ("delete", "/v1/sessions/{session_id}"): {401, 404, 410, 503},
    ("get", "/v1/sessions"): {401, 422, 503},
    ("delete", "/v1/sessions"): {401, 422, 503},
    ("post", "/v1/steps"): {401, 413, 422, 503},
    ("get", "/healthz"): set(),
    ("get", "/readyz"): {503},
    ("get", "/metrics"): set(),
    ("get", "/v2"): set(),
    ("get", "/v2/health/live"): set(),
    ("get", "/v2/health/ready"): {400},
    ("get", "/v2/models/{name}"): {401, 404, 503},
    ("get", "/v2/models/{name}/versions/{version}"): {401, 404, 503},
    ("get", "/v2/models/{name}/config"): {401, 404, 503},
    ("get", "/v2/models/{name}/versions/{version}/config"): {401, 404, 503},
    ("get", "/v2/models/stats"): {401, 503},
    ("get", "/v2/models/{name}/stats"): {401, 404, 503},
    ("get", "/v2/models/{name}/versions/{version}/stats"): {401, 404, 503},
    ("get", "/v2/models"): {401, 503},
    ("post", "/v2/repository/index"): {401, 503},
    ("get", "/v2/models/{name}/ready"): {400, 401, 404},
    ("get", "/v2/models/{name}/versions/{version}/ready"): {400, 401, 404},
    ("post", "/v2/models/{name}/infer"): {400, 401, 404, 409, 413, 429, 503},
    ("post", "/v2/models/{name}/versions/{version}/infer"): {400, 401, 404, 409, 413, 429, 503},
}


def error_statuses(operation: dict) -> set[int]:
    return {int(s) for s in operation["responses"] if int(s) >= 400}


def test_each_route_documents_only_its_errors(client):
    spec = client.get("/openapi.json").json()
    documented = {
        (method, path): error_statuses(operation)
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }
    assert documented == EXPECTED
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's own 422


def test_documented_codes_have_their_status(client):
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        table = error_codes.OIP_STATUS if path.startswith("/v2") else error_codes.STATUS
        body = "OipErrorBody" if path.startswith("/v2") else "ErrorBody"
        for operation in operations.values():
            for status, response in operation["responses"].items():
                description = response["description"]
                if not description.startswith("error codes: "):
                    continue
                codes = description.removeprefix("error codes: ").split(", ")
                assert {table[c] for c in codes} == {int(status)}, (path, status)
                schema = response["content"]["application/json"]["schema"]["$ref"]
                assert schema.endswith("/" + body), (path, status)


def test_a_documented_error_is_one_the_route_answers(client):
    # Spot checks that the table is not wishful: each status below is documented for its route.
    assert client.get("/v1/sessions/no-such-session").status_code == 404
    r = client.post("/v1/sessions/no-such-session/steps", json={"inputs": [[0.0, 0.0]]})
    assert r.status_code == 404
    assert client.post("/v1/steps", json={"steps": []}).status_code == 422
    assert client.post("/v2/models/tiny/infer", json={"inputs": []}).status_code == 400
