"""Limits and edge cases: many-sequence /predict, ids of expired sessions, settings that would
make sessions unrestorable, the metrics' label set."""

from __future__ import annotations

import pytest

from service.app import create_app
from tests.service.conftest import (
    TINY,
    assert_rows_close,
    open_session,
    predict,
    random_rows,
    serving,
)


def test_many_short_sequences_are_grouped_and_answered(client):
    # Grouping used to re-sum each group per member (quadratic); 1,024 one-row sequences
    # must come back promptly and each equal its own forward.
    rows = random_rows(1024, seed=5)
    outputs = predict(client, [[row] for row in rows])
    assert len(outputs) == 1024
    assert_rows_close([o[0] for o in outputs[:3]], [predict(client, [[r]])[0][0] for r in rows[:3]])


def test_too_many_sequences_is_413(client):
    r = client.post(
        "/v1/models/tiny/predict", json={"inputs": [[[0.0, 0.0]]] * 1025, "outputs": "last"}
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_many_sequences"


def test_an_expired_unswept_id_can_be_taken_again(client, clock):
    first = open_session(client, session_id="reused-id-1", ttl_s=5, prefix=random_rows(3, 1))
    clock.advance(6)  # expired, but the sweeper (hourly in these settings) has not run
    second = open_session(client, session_id="reused-id-1")
    assert (first["position"], second["position"]) == (3, 0)


def test_settings_that_make_snapshots_unrestorable_refuse_to_start(make_settings):
    limit = TINY.receptive_field - 2  # a snapshot holds R - 1 rows
    with pytest.raises(ValueError, match="could not be restored"):
        create_app(make_settings(max_timesteps_per_request=limit))


def test_unknown_methods_share_one_metrics_label(client):
    for method in ("FOO1", "BAR2"):
        client.request(method, "/v1/models")
    text = client.get("/metrics").text
    assert 'method="other"' in text
    assert "FOO1" not in text and "BAR2" not in text


def test_an_anonymous_body_is_refused_before_it_is_read(make_settings):
    key = "k" * 24
    with serving(create_app(make_settings(api_keys=[key]))) as c:
        r = c.post(
            "/v1/models/tiny/predict",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 401  # not 422: the body was never parsed
        assert r.json()["error"]["code"] == "unauthorized"
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            ok = c.post("/v1/models/tiny/predict", json={"inputs": [[[0.0, 0.0]]]}, headers=headers)
            assert ok.status_code == 200, ok.text
