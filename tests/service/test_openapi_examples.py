"""Every route of the OpenAPI document, sent as /docs' "Try it out" fills it in (the request
body's example, each path parameter's example), is answered 2xx by the server as it is."""

from __future__ import annotations

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import serving


def operations(paths: dict) -> list[tuple[str, str, dict]]:
    """(method, path, operation) in the order a user would try them: the create example first
    (the others name the session it opens), then the rest, deleting that session, and closing
    every session last."""
    found = [(m, p, op) for p, item in paths.items() for m, op in item.items()]

    def order(item: tuple[str, str, dict]) -> int:
        method, path, _ = item
        if (method, path) == ("post", "/v1/sessions"):
            return 0
        return {"delete": 3 if path == "/v1/sessions" else 2}.get(method, 1)

    return sorted(found, key=order)


def test_every_route_answers_its_documented_example_as_filled_in():
    with serving(create_app(Settings(max_sessions=8))) as c:
        ops = operations(c.get("/openapi.json").json()["paths"])
        assert len(ops) >= 30
        for method, path, op in ops:
            url = path
            for parameter in op.get("parameters", []):
                if parameter["in"] == "path":
                    assert "example" in parameter, f"{method} {path}: {parameter['name']}"
                    url = url.replace(f"{{{parameter['name']}}}", str(parameter["example"]))
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                assert body.get("example") is not None, f"{method} {path} has no example"
            kwargs = {"json": body["example"]} if body is not None else {}
            r = c.request(method.upper(), url, **kwargs)
            assert 200 <= r.status_code < 300, (method, path, r.status_code, r.text)
            if path == "/v1/steps":  # 200 with an error per item that failed: none may
                assert all("error" not in item for item in r.json()["results"]), r.text
