"""Python client for tcnserve: sync (`Client`) and asyncio (`AsyncClient`), numpy in and out.

Sessions track their offsets and keep the last R - 1 inputs, so a lost connection is retried
idempotently and a lost session (server restart, replica loss, TTL) is rebuilt transparently.
Needs numpy, httpx and websockets only (no torch).
"""

from service.client.aio import AsyncClient, AsyncSession
from service.client.protocol import RetriesExhausted, RetryPolicy, ServerError
from service.client.sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "RetriesExhausted",
    "RetryPolicy",
    "ServerError",
    "Session",
]
