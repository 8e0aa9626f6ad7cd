"""Request limits that both the edge (service/models/inputs.py, routes) and the SessionManager
check."""

from __future__ import annotations

from dataclasses import dataclass

from service.protocol.errors import KeyQuotaExceeded, TooManyTimesteps

# A session id, client-chosen or generated: what every route and the SessionManager accept.
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{8,128}$"

# Most ASCII digits a numeric header may have (Content-Length, Inference-Header-Content-Length):
# 18 digits hold any int64, and no body of ours comes near 10^18 bytes.
MAX_HEADER_DIGITS = 18


@dataclass(frozen=True)
class RequestLimits:
    """The per-request counts of the settings, as every decoder takes them."""

    max_timesteps: int  # max_timesteps_per_request
    max_sequences: int  # max_sequences_per_request


class InflightBudget:
    """Bytes of request bodies and WebSocket messages held at once by every connection of one
    event loop together (max_inflight_body_bytes): each is held until it is answered."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold `size` more bytes, or refuse (False, nothing held) if that passes the limit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


class StreamsPerKey:
    """Open WebSocket streams of each API key, at most `limit` each (None: no cap)."""

    def __init__(self, limit: int | None, retry_after_s: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.open: dict[str, int] = {}

    def acquire(self, owner: str) -> None:
        """Count one more stream of `owner`; KeyQuotaExceeded at the limit."""
        held = self.open.get(owner, 0)
        if self.limit is not None and held >= self.limit:
            raise KeyQuotaExceeded(
                f"this API key holds {held} open streams, its limit (max_streams_per_key); "
                "close one, or multiplex many sessions on one socket (WS /v1/streams)",
                self.retry_after_s,
            )
        self.open[owner] = held + 1

    def release(self, owner: str) -> None:
        held = self.open[owner] - 1
        if held:
            self.open[owner] = held
        else:
            del self.open[owner]


def header_int(value: str | bytes | None) -> int | None:
    """A numeric header's value: 1-MAX_HEADER_DIGITS ASCII digits, else None (absent, or not a
    plain non-negative decimal: int() alone takes '²', '+1', ' 1', '1_0' and 5,000 digits)."""
    if value is None or not 0 < len(value) <= MAX_HEADER_DIGITS or not value.isascii():
        return None
    return int(value) if value.isdigit() else None


def check_timesteps(total: int, limit: int) -> None:
    """Refuse requests whose rows, summed over sequences, exceed max_timesteps_per_request."""
    if total > limit:
        raise TooManyTimesteps(
            f"the request has {total} timesteps; at most {limit} per request "
            "(max_timesteps_per_request): split it into several requests"
        )
