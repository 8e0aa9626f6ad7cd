"""Every request body /docs fills in for "Try it out" is accepted by the server as it is."""

from __future__ import annotations

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import serving

# The order a user would try them in: the push and /v1/steps examples name the session the
# create example opens.
ORDER = [
    ("post", "/v1/sessions"),
    ("post", "/v1/sessions/{session_id}/steps"),
    ("post", "/v1/steps"),
    ("post", "/v1/models/{name}/predict"),
    ("post", "/v2/models/{name}/infer"),
]


def test_every_documented_request_example_is_accepted_as_filled_in():
    with serving(create_app(Settings(max_sessions=8))) as c:
        paths = c.get("/openapi.json").json()["paths"]
        documented = {
            (method, path): op["requestBody"]["content"]["application/json"]
            for path, item in paths.items()
            for method, op in item.items()
            if "requestBody" in op and "application/json" in op["requestBody"]["content"]
        }
        assert set(ORDER) <= set(documented), sorted(documented)
        for method, path in ORDER:
            example = documented[(method, path)].get("example")
            assert example is not None, f"{method} {path} has no example"
            url = path.format(session_id=example.get("session_id", "sensor-0042"), name="default")
            r = c.request(method.upper(), url, json=example)
            assert 200 <= r.status_code < 300, (path, r.status_code, r.text)
