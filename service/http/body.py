"""Reading JSON request bodies and writing JSON answers, without FastAPI's per-item validation.

Handlers read the raw body (already size-checked by BodyLimitMiddleware) and decode it with
service/models/inputs.py; large bodies are decoded on the runtime's decode thread so the event loop
keeps answering. Answers are encoded by msgspec from arrays: never a NaN or Infinity literal.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Request, Response
from pydantic import BaseModel

from service.protocol.errors import InvalidInput

_encoder = msgspec.json.Encoder()


async def body_bytes(request: Request) -> bytes:
    data = await request.body()
    if not data:
        raise InvalidInput("body: send a JSON object (the body is empty)")
    return data


def json_response(content: Any, status_code: int = 200) -> Response:
    """`content` holds only JSON types (arrays converted with .tolist() by the caller)."""
    return Response(_encoder.encode(content), status_code, media_type="application/json")


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra documenting a request body the handler decodes itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    media: dict[str, Any] = {"schema": inline(schema)}
    example = getattr(model, "EXAMPLE", None)
    if example is not None:  # what Swagger's "Try it out" fills in: a body the server accepts
        media["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": media}}}
