"""Baseline service for bench/service_http.py: no streaming state, recompute the window per push.

Each session keeps only its last R - 1 input rows (R = receptive field); a push runs
TCN.forward over those rows plus the new ones and returns the outputs of the new rows. This is
what serving a TCN without a streaming engine costs. Same routes as tcnserve's session API
(POST /v1/sessions, POST /v1/sessions/{id}/steps), one model thread, no batching.

    python bench/window_baseline.py --port 8100 [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from model import load_model

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "service" / "default_model"


class CreateBody(BaseModel):
    model: str = "default"
    prefix: list[list[float]] | None = None


class StepBody(BaseModel):
    inputs: list[list[float]]
    offset: int | None = None


def build_app(model_dir: Path) -> FastAPI:
    net = load_model(model_dir)
    keep = net.receptive_field - 1
    windows: dict[str, np.ndarray] = {}
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-model")

    @torch.inference_mode()
    def recompute(history: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list]:
        window = np.concatenate([history, rows])  # (W, C), W <= R - 1 + T
        y = net(torch.from_numpy(window).T[None])[0].T  # (1, C, W) -> (W, out)
        return window[max(0, len(window) - keep) :], y[-len(rows) :].tolist()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        executor.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/v1/sessions", status_code=201)
    async def create(body: CreateBody) -> dict:
        sid = secrets.token_urlsafe(16)
        windows[sid] = np.zeros((0, net.config.in_channels), dtype=np.float32)
        outputs = None
        if body.prefix:
            outputs = await push(sid, StepBody(inputs=body.prefix))
        return {"session_id": sid, "position": 0, "outputs": outputs}

    @app.post("/v1/sessions/{sid}/steps")
    async def push(sid: str, body: StepBody) -> dict:
        if sid not in windows:
            raise HTTPException(404)
        rows = np.asarray(body.inputs, dtype=np.float32)
        loop = asyncio.get_running_loop()
        windows[sid], outputs = await loop.run_in_executor(executor, recompute, windows[sid], rows)
        return {"outputs": outputs, "position": 0}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    uvicorn.run(build_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
