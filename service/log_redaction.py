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
# A secret header's name, then what separates it from its value in a log line, a dict or a
# tuple repr ("authorization: x", "'x-api-key': 'x'", "(b'cookie', b'x')"), then the value.
_HEADER_LINE = re.compile(
    r"((?:proxy-)?authorization|x-api-key|cookie)(['\"]?\s*[:=,]\s*(?-i:b)?['\"]?)"
    r"([^\r\n,'\"}\])]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    if "=" in text:
        text = _QUERY_TOKEN.sub(r"\1" + REDACTED, text)
    if ":" in text or "=" in text or "," in text:
        text = _HEADER_LINE.sub(r"\1\2" + REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record's arguments (not its shape: uvicorn's access formatter unpacks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            name = args[0].decode("latin-1") if args and isinstance(args[0], bytes) else None
            name = args[0] if args and isinstance(args[0], str) else name
            if len(args) == 2 and name is not None and name.strip().lower() in SECRET_HEADERS:
                record.args = (args[0], REDACTED)  # websockets: "< %s: %s" per header
            else:
                record.args = tuple(_clean(a) for a in args)
        elif isinstance(args, dict):  # "%(name)s" formats, or one dict argument
            record.args = {
                k: REDACTED if str(k).strip().lower() in SECRET_HEADERS else _clean(v)
                for k, v in args.items()
            }
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if record.exc_info and not record.exc_text:  # tracebacks may quote headers too
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def _clean(value: object) -> object:
    """An argument as it will be printed, redacted; plain numbers are left as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (bytes, dict, list, tuple)):
        text = str(value)
        cleaned = redact(text)
        return cleaned if cleaned != text else value
    return value


def install(logger_names: tuple[str, ...] = ("", "uvicorn", "uvicorn.error", "uvicorn.access")):
    """Attach the filter to every handler of these loggers (idempotent)."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())
