"""API-key authentication: constant-time comparison, and an owner id for each key."""

from __future__ import annotations

import hashlib
import hmac

from service.protocol.errors import Unauthorized

ANONYMOUS = "anonymous"


class ApiKeys:
    """The configured keys; `owner` names the key a request carries (never the key itself)."""

    def __init__(self, keys: list[str]):
        # Compare fixed-length digests so neither the key's length nor its prefix leaks by time.
        self._digests = [(_digest(k), f"key-{_digest(k).hex()[:12]}") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None, x_api_key: str | None) -> str:
        """The owner id for the presented key; Unauthorized when keys are on and it is wrong."""
        if not self._digests:
            return ANONYMOUS
        # An empty X-API-Key (a proxy or client template with the value left blank) is no key:
        # it must not hide the Bearer key beside it.
        presented = x_api_key.strip() if x_api_key else None
        if not presented and authorization:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = credentials.strip()
        if not presented:
            raise Unauthorized(
                "this server needs an API key: send it as 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>' (the Python client and the CLI read TCNSERVE_API_KEY or "
                "--api-key; the server's keys are TCNSERVE_API_KEYS)"
            )
        candidate = _digest(presented)
        match = None
        for digest, owner in self._digests:  # no early exit: every key is compared
            if hmac.compare_digest(candidate, digest):
                match = owner
        if match is None:
            raise Unauthorized("invalid API key")
        return match


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
