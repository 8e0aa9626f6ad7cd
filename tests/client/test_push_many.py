"""Client.push_many / AsyncClient.push_many: many sessions per request (POST /v1/steps), with
every guarantee of a single push: outputs equal /predict, lost sessions restored, lost replies
retried without applying twice, per-item errors."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from service.client import AsyncClient, Client, RetryPolicy, ServerError
from tests.client.conftest import KEY, assert_outputs, rows_of, server_position

FAST = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=0.2)
PLANS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]]  # rows per session per call


def test_many_sessions_in_one_call_equal_predict(live, reference):
    seqs = [rows_of(sum(p[i] for p in PLANS), seed=40 + i) for i in range(5)]
    with Client(live.url, KEY, retry=FAST) as client:
        sessions = [client.open_session("tiny") for _ in seqs]
        fed, outputs = [0] * 5, [[] for _ in seqs]
        for plan in PLANS:
            pushes = [
                (s, seqs[i][fed[i] : fed[i] + n])
                for i, (s, n) in enumerate(zip(sessions, plan, strict=True))
            ]
            for i, y in enumerate(client.push_many(pushes)):
                outputs[i].append(y)
                fed[i] += plan[i]
        for i, session in enumerate(sessions):
            assert_outputs(np.concatenate(outputs[i]), reference("tiny", seqs[i]))
            assert session.position == server_position(live.url, session.id) == fed[i]
            session.close()


def test_a_lost_session_is_restored_and_only_its_item_resent(live, reference):
    x = [rows_of(20, seed=50 + i) for i in range(3)]
    with Client(live.url, KEY, retry=FAST) as client:
        sessions = [client.open_session("tiny") for _ in x]
        first = client.push_many([(s, xi[:12]) for s, xi in zip(sessions, x, strict=True)])
        r = httpx.delete(f"{live.url}/v1/sessions/{sessions[1].id}", headers={"X-API-Key": KEY})
        assert r.status_code == 204
        rest = client.push_many([(s, xi[12:]) for s, xi in zip(sessions, x, strict=True)])
        for i, session in enumerate(sessions):
            assert_outputs(np.concatenate([first[i], rest[i]]), reference("tiny", x[i]))
            assert server_position(live.url, session.id) == 20
            session.close()


def test_a_lost_reply_is_retried_not_applied_twice(proxy, live, reference):
    x = [rows_of(12, seed=60 + i) for i in range(2)]
    with Client(proxy.url, KEY, retry=FAST) as client:
        sessions = [client.open_session("tiny") for _ in x]
        proxy.lose_reply_to("/v1/steps", nth=2)
        outputs = [
            client.push_many([(s, xi[k : k + 4]) for s, xi in zip(sessions, x, strict=True)])
            for k in range(0, 12, 4)
        ]
        assert proxy.lost == ["/v1/steps"]
        for i, session in enumerate(sessions):
            assert_outputs(np.concatenate([o[i] for o in outputs]), reference("tiny", x[i]))
            assert server_position(live.url, session.id) == 12
            session.close()


def test_an_item_the_server_refuses_fails_alone(live, reference):
    with Client(live.url, KEY, retry=FAST) as client:
        good, bad = client.open_session("tiny"), client.open_session("tiny")
        x = rows_of(6, seed=70)
        huge = np.full((2, 2), 3e38, dtype=np.float32)  # beyond the model's max_input_abs
        results = client.push_many([(good, x), (bad, huge)], raise_errors=False)
        assert_outputs(results[0], reference("tiny", x))
        assert isinstance(results[1], ServerError) and results[1].status == 422
        assert (good.position, bad.position) == (6, 0)
        with pytest.raises(ServerError, match="invalid_input"):
            client.push_many([(good, x), (bad, huge)])
        assert good.position == 12  # the good item was applied and recorded before the raise
        with pytest.raises(ValueError, match="at most once"):
            client.push_many([(good, x), (good, x)])
        good.close()
        bad.close()


def test_async_push_many_equals_predict(live, reference):
    async def main() -> None:
        seqs = [rows_of(sum(p[i] for p in PLANS), seed=80 + i) for i in range(5)]
        async with AsyncClient(live.url, KEY, retry=FAST) as client:
            sessions = [await client.open_session("tiny") for _ in seqs]
            fed, outputs = [0] * 5, [[] for _ in seqs]
            for plan in PLANS:
                pushes = [(s, seqs[i][fed[i] : fed[i] + plan[i]]) for i, s in enumerate(sessions)]
                for i, y in enumerate(await client.push_many(pushes)):
                    outputs[i].append(y)
                    fed[i] += plan[i]
            for i, session in enumerate(sessions):
                assert_outputs(np.concatenate(outputs[i]), reference("tiny", seqs[i]))
                await session.close()

    asyncio.run(main())
