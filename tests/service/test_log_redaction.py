"""No API key survives the log filter, whatever form a library logs it in."""

from __future__ import annotations

import logging
import sys

import pytest

from service.log_redaction import RedactSecrets, redact

SECRET = "s3cret-key-0123456789"


@pytest.mark.parametrize(
    "text",
    [
        f"authorization: Bearer {SECRET}",
        f"X-API-Key: {SECRET}",
        f"{{'authorization': 'Bearer {SECRET}'}}",
        f'{{"x-api-key": "{SECRET}"}}',
        f"[(b'x-api-key', b'{SECRET}')]",
        f"< b'authorization': b'Bearer {SECRET}'",
        f"GET /v1/sessions/abc/stream?framing=offset&token={SECRET} HTTP/1.1",
        f"cookie: session={SECRET}",
    ],
)
def test_every_form_is_redacted(text):
    assert SECRET not in redact(text)


def records():
    yield logging.LogRecord("w", 10, "", 1, "< %s: %s", ("Authorization", f"Bearer {SECRET}"), None)
    yield logging.LogRecord("w", 10, "", 1, "< %s: %s", (b"x-api-key", SECRET.encode()), None)
    yield logging.LogRecord("w", 10, "", 1, "headers %s", ({"X-API-Key": SECRET},), None)
    yield logging.LogRecord("w", 10, "", 1, "scope %s", ([(b"x-api-key", SECRET.encode())],), None)
    try:
        raise ValueError(f"bad header authorization: Bearer {SECRET}")
    except ValueError:
        yield logging.LogRecord("w", 40, "", 1, "failed", (), sys.exc_info())


@pytest.mark.parametrize("record", list(records()), ids=lambda r: r.msg)
def test_records_are_redacted_with_their_arguments_and_tracebacks(record):
    assert RedactSecrets().filter(record)
    assert SECRET not in logging.Formatter().format(record)
