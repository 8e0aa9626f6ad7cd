"""The same web stack doing no work: FastAPI + uvicorn (httptools, websockets-sansio, one
worker) reading what tcnserve reads and answering with what it answers, without a model.

The floor of bench/edge_http.py (HTTP pushes, /v1/steps) and bench/ws_stream.py --echo
(WebSocket pushes: a binary frame is answered with the offset header + 1 and one float32 per
row, a JSON push with its outputs and position), so their ratios say what tcnserve's own work
costs over the framework's.

Run: python bench/noop_app.py PORT [ITEMS]
"""

from __future__ import annotations

import json
import secrets
import struct
import sys

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect

app = FastAPI()
STEP = b'{"outputs":[[0.123456789]],"position":1}'
HEADER = struct.Struct("<q")
COUNT = struct.Struct("<I")  # a multiplexed frame's push count
PUSH = struct.Struct("<qIH")  # offset, rows, width (after the session id)
ROWS = struct.Struct("<IH")
OUTPUT = struct.pack("<f", 0.123456789)
# A row's float32 inputs: the built-in model's two, or argv[3] (bench/scaling.py --model).
ROW_BYTES = 4 * (int(sys.argv[3]) if __name__ == "__main__" and len(sys.argv) > 3 else 2)


@app.post("/v1/sessions", status_code=201)
async def create(request: Request) -> dict:
    await request.body()
    return {"session_id": secrets.token_urlsafe(24), "model": "default", "position": 0}


@app.delete("/v1/sessions/{session_id}", status_code=204)
async def delete(session_id: str) -> Response:
    return Response(status_code=204)


@app.get("/metrics")
async def metrics() -> Response:
    return Response(b"", media_type="text/plain")


@app.websocket("/v1/sessions/{session_id}/stream")
async def echo(websocket: WebSocket, session_id: str) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                (offset,) = HEADER.unpack_from(data)
                rows = (len(data) - HEADER.size) // ROW_BYTES
                await websocket.send_bytes(HEADER.pack(offset + rows) + OUTPUT * rows)
            else:
                body = json.loads(message["text"])
                rows = len(body["inputs"])
                answer = {"outputs": [[0.123456789]] * rows, "position": body["offset"] + rows}
                await websocket.send_text(json.dumps(answer))
    except WebSocketDisconnect:
        return


@app.websocket("/v1/streams")
async def echo_many(websocket: WebSocket) -> None:
    """The multiplexed stream: walks a frame of pushes (service/protocol/wire.py's layout, read with
    struct alone) and answers each with its next position and one float32 per row."""
    await websocket.accept()
    try:
        while True:
            data = await websocket.receive_bytes()
            (count,) = COUNT.unpack_from(data)
            at, parts = COUNT.size, [data[: COUNT.size]]
            for _ in range(count):
                end = at + 1 + data[at]
                offset, rows, width = PUSH.unpack_from(data, end)
                parts += [data[at:end], HEADER.pack(offset + rows), ROWS.pack(rows, 1)]
                parts.append(OUTPUT * rows)
                at = end + PUSH.size + 4 * rows * width
            await websocket.send_bytes(b"".join(parts))
    except WebSocketDisconnect:
        return


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
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        http="httptools",
        ws_per_message_deflate=False,
    )
