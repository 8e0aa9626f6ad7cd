"""A logging filter that keeps API keys out of every log line, at every level.

Keys reach log records three ways: `?token=` in a WebSocket URL (uvicorn's access log), the
upgrade request's headers (the websockets library logs each one at debug level as
`< name: value`), and any message that quotes a header. The filter is attached to every handler,
so records of any logger that reaches one are cleaned.
"""

from __future__ import annotations

import logging
import re

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
REDACTED = "***"
_QUERY_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
_HEADER_LINE = re.compile(
    r"((?:proxy-)?authorization|x-api-key|cookie)(\s*[:=]\s*)[^\r\n,'\"]+", re.IGNORECASE
)


def redact(text: str) -> str:
    if "=" in text:
        text = _QUERY_TOKEN.sub(r"\1" + REDACTED, text)
    if ":" in text or "=" in text:
        text = _HEADER_LINE.sub(r"\1\2" + REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record's arguments (not its shape: uvicorn's access formatter unpacks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            if (
                len(args) == 2
                and isinstance(args[0], str)
                and args[0].strip().lower() in SECRET_HEADERS
            ):
                record.args = (args[0], REDACTED)  # websockets: "< %s: %s" per header
            else:
                record.args = tuple(_clean(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: _clean(v) for k, v in args.items()}
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def _clean(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


def install(logger_names: tuple[str, ...] = ("", "uvicorn", "uvicorn.error", "uvicorn.access")):
    """Attach the filter to every handler of these loggers (idempotent)."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())
