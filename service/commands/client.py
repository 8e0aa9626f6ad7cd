"""`tcnserve predict` and `tcnserve stream`: the Python client from the command line.

Rows come from a CSV file (one timestep per line, comma-separated), a .npy file of shape
(T, in_channels), or standard input as CSV (`-`). Outputs go to standard output as CSV, one line
per timestep; progress goes to standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from service.client import Client, RetriesExhausted, ServerError


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("TCNSERVE_URL", "http://127.0.0.1:8000"),
        help="server base URL (default: $TCNSERVE_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument("--model", default="default", help="model name")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TCNSERVE_API_KEY"),
        help="API key (default: $TCNSERVE_API_KEY)",
    )
    parser.add_argument("file", nargs="?", default="-", help="CSV or .npy file, or - for stdin")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--skip-header", action="store_true", help="ignore the CSV file's first line"
    )
    parser.add_argument(
        "--embedding",
        type=_floats,
        metavar="V,V,...",
        help="a conditioned model's embedding of the sequence (embedding_dims in /v1/models)",
    )
    if name == "predict":
        parser.add_argument("--last", action="store_true", help="print only the last output")
        parser.set_defaults(_action=_predict)
    else:
        parser.add_argument("--chunk", type=int, default=1, help="rows per message")
        parser.add_argument("--json", action="store_true", help="JSON text frames, not binary")
        parser.add_argument("--session-id", help="choose the session id (8-128 [A-Za-z0-9_-])")
        parser.set_defaults(_action=_stream)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        message = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def run(args: argparse.Namespace) -> int:
    try:
        _check_reachable(args.url)
        with Client(args.url, args.api_key) as client:
            args._action(client, args)
    except BrokenPipeError:  # `tcnserve stream ... | head`: the reader has what it wanted
        with contextlib.suppress(OSError):  # no second error when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ServerError, RetriesExhausted, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _check_reachable(url: str) -> None:
    """Fail at once, and say why, when nothing listens at `url` (the client would retry)."""
    try:
        httpx.get(f"{url.rstrip('/')}/healthz", timeout=5)
    except httpx.ConnectError:
        raise ConnectionRefusedError(
            f"connection refused: is the server running at {url}? (start one with "
            "`tcnserve serve`, or pass --url)"
        ) from None
    except httpx.HTTPError:
        pass  # slow or odd: leave it to the client's retries and messages


def _predict(client: Client, args: argparse.Namespace) -> None:
    rows = np.asarray(list(_read_rows(args.file, args.skip_header)))
    try:
        embeddings = None if args.embedding is None else [args.embedding]
        outputs = client.predict(
            args.model, [rows], outputs="last" if args.last else "all", embeddings=embeddings
        )[0]
    except ServerError as e:
        if e.code in ("too_many_timesteps", "body_too_large"):
            e.args = (f"{e.args[0]} (stream a sequence this long with `tcnserve stream`)",)
        raise
    _write(outputs)


def _stream(client: Client, args: argparse.Namespace) -> None:
    total = _count_rows(args.file)
    opened = client.open_session(args.model, session_id=args.session_id, embedding=args.embedding)
    with opened as session:
        rows = tqdm(
            _read_rows(args.file, args.skip_header),
            total=total,
            unit="step",
            disable=args.quiet or not sys.stderr.isatty(),
            file=sys.stderr,
        )
        for output in session.stream(rows, chunk=args.chunk, binary=not args.json):
            _write(output[None])
            sys.stdout.flush()


def _read_rows(source: str, skip_header: bool = False) -> Iterator[np.ndarray]:
    if source != "-" and Path(source).suffix == ".npy":
        array = np.load(source, allow_pickle=False)
        yield from (array[:, None] if array.ndim == 1 else array)
        return
    if source == "-" and sys.stdin.isatty():
        print(
            "reading rows from standard input, one comma-separated timestep per line (end with "
            "Ctrl-D); or name a CSV or .npy file",
            file=sys.stderr,
        )
    lines = sys.stdin if source == "-" else Path(source).open()  # noqa: SIM115
    rows, width = 0, None
    try:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if (skip_header and number == 1) or not line or line.startswith("#"):
                continue
            try:
                row = np.array([float(v) for v in line.split(",")], dtype=np.float32)
            except ValueError:
                hint = (
                    " (a header line? pass --skip-header, or start a comment line with #)"
                    if rows == 0
                    else ""
                )
                raise ValueError(
                    f"{source}:{number}: not a row of numbers: {line!r}{hint}"
                ) from None
            if width is not None and len(row) != width:
                raise ValueError(
                    f"{source}:{number}: {len(row)} values, but the rows before have {width}: "
                    "every row needs the same number of values"
                )
            width = len(row)
            rows += 1
            yield row
    finally:
        if lines is not sys.stdin:
            lines.close()
    if rows == 0:
        raise ValueError(f"{source}: no rows (one timestep per line, comma-separated numbers)")


def _count_rows(source: str) -> int | None:
    if source == "-":
        return None
    if Path(source).suffix == ".npy":
        return len(np.load(source, mmap_mode="r", allow_pickle=False))
    return None


def _write(rows: np.ndarray) -> None:
    for row in rows:
        print(",".join(f"{v:.7g}" for v in row))
