"""Service test fixtures: tiny seeded checkpoints, a fake clock, apps with their lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model import TCN, TCNConfig, save_model
from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings

TINY = TCNConfig(in_channels=2, channels=(6, 6, 5), kernel_size=3, out_channels=2)  # R = 29
TOKENS = TCNConfig(in_channels=4, channels=(5, 5), kernel_size=2, vocab_size=7)


class FakeClock:
    """Unix seconds that move only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_model(
    directory: Path, config: TCNConfig, seed: int, metadata: dict | None = None
) -> Path:
    """A checkpoint with every weight redrawn from N(0, 0.4), so outputs depend on every input."""
    torch.manual_seed(seed)
    net = TCN(config)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.4)
    return save_model(net, directory, metadata or {"task": "test", "trained": False})


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny"), TINY, seed=1)


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tokens"), TOKENS, seed=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_settings(tiny_dir: Path):
    def make(**overrides) -> Settings:
        values = {"models": {"tiny": tiny_dir}, "max_sessions": 32, "sweep_interval_s": 3600}
        return Settings(**{**values, **overrides})

    return make


def runtime_of(app: FastAPI) -> Runtime:
    return app.state.runtime


@contextlib.contextmanager
def serving(app: FastAPI, **client_kwargs) -> Iterator[TestClient]:
    """A TestClient with the lifespan run and the models loaded."""
    with TestClient(app, **client_kwargs) as client:
        assert runtime_of(app).loaded.wait(60), "models did not load"
        yield client


@pytest.fixture
def client(make_settings, clock: FakeClock) -> Iterator[TestClient]:
    with serving(create_app(make_settings(), clock=clock)) as c:
        yield c


@contextlib.asynccontextmanager
async def async_serving(app: FastAPI, **client_kwargs) -> AsyncIterator[httpx.AsyncClient]:
    """An AsyncClient over ASGITransport, inside the app's lifespan, models loaded."""
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(runtime_of(app).loaded.wait, 60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", **client_kwargs
        ) as c:
            yield c


@pytest_asyncio.fixture
async def aclient(make_settings, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    async with async_serving(create_app(make_settings(), clock=clock)) as c:
        yield c


def predict(client: TestClient, inputs: list, model: str = "tiny", outputs: str = "all") -> list:
    r = client.post(f"/v1/models/{model}/predict", json={"inputs": inputs, "outputs": outputs})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def assert_rows_close(actual: list, expected: list, atol: float = 1e-5) -> None:
    a, e = torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    torch.testing.assert_close(a, e, atol=atol, rtol=0)


def random_rows(length: int, seed: int, channels: int = 2) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(length, channels, generator=gen).tolist()
