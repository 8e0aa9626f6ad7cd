"""The same web stack doing no work: FastAPI + uvicorn (httptools, one worker) answering each
body with a fixed JSON answer of the same shape tcnserve gives. The floor for bench/edge_http.py.

Run: python bench/noop_app.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()
STEP = b'{"outputs":[[0.123456789]],"position":1}'


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/v1/sessions/{session_id}/steps")
async def steps(session_id: str, request: Request) -> Response:
    await request.body()
    return Response(STEP, media_type="application/json")


@app.post("/v1/steps")
async def many(request: Request) -> Response:
    await request.body()
    return Response(app.state.many_answer, media_type="application/json")


if __name__ == "__main__":
    items = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    app.state.many_answer = (
        b'{"results":['
        + b",".join(
            b'{"session_id":"%024d","outputs":[[0.123456789]],"position":1}' % i
            for i in range(items)
        )
        + b"]}"
    )
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http="httptools")
