"""The code blocks of README.md and docs/*.md, as the doc-example tests read them.

A block is a fenced ```bash, ```python, ```json or ```text block; `shown` is the ```json or
```text block right after it (what running it prints), if any. A bash block's commands are its
logical lines (`commands`), each with the comment lines right after it (what it answers).
Addresses are the one thing the tests change in an example: `localhost:8000`,
`127.0.0.1:8000`, `server:8000` (and gRPC's `127.0.0.1:8001`) become the test's own servers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
WILDCARDS = ("…", "...")


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    lang: str
    text: str
    shown: str | None  # the ```json / ```text block right after it

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[str]:
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def blocks(lang: str | None = None) -> list[Block]:
    found: list[Block] = []
    for name in doc_files():
        text = (ROOT / name).read_text()
        fences = list(FENCE.finditer(text))
        for i, m in enumerate(fences):
            nxt = fences[i + 1] if i + 1 < len(fences) else None
            adjacent = nxt is not None and not text[m.end() : nxt.start()].strip()
            shown = nxt.group(2) if adjacent and nxt.group(1) in ("json", "text") else None
            block = Block(name, text[: m.start()].count("\n") + 1, m.group(1), m.group(2), shown)
            if lang is None or block.lang == lang:
                found.append(block)
    return found


def commands(block: str) -> list[tuple[str, list[str]]]:
    """(command, the comment lines right after it) for each command of a bash block; a
    command continues over `\\`, an open quote and a trailing `|`."""
    out: list[tuple[str, list[str]]] = []
    current = ""
    for line in block.splitlines():
        if current:
            current += "\n" + line
        elif line.lstrip().startswith("#"):
            if out:
                out[-1][1].append(line.strip())
            continue
        elif line.strip():
            current = line.strip()
        else:
            continue
        text = current.replace("\\\n", " ")
        if text.count("'") % 2 or text.count('"') % 2 or text.rstrip().endswith(("\\", "|")):
            continue
        out.append((text, []))
        current = ""
    return out


def local_addresses(text: str, http_port: int, grpc_port: int | None = None) -> str:
    """An example with its server addresses made the test's servers'."""
    text = re.sub(r"(localhost|127\.0\.0\.1|server):8000\b", f"127.0.0.1:{http_port}", text)
    if grpc_port is not None:
        text = re.sub(r"(localhost|127\.0\.0\.1):8001\b", f"127.0.0.1:{grpc_port}", text)
    return text


# ----- what an example shows -------------------------------------------------------------------


def expected_json(comments: list[str]) -> object | None:
    """The JSON a command's comment shows, with bare … made into wildcard strings."""
    if not comments or not re.match(r"#\s*(->\s*)?[{\[]", comments[0]):
        return None
    return shown_json(" ".join(re.sub(r"^#\s*(->\s*)?", "", c) for c in comments))


def shown_json(text: str) -> object:
    text = re.sub(r",\s*(…|\.\.\.)\s*}", ', "…": "…"}', text)  # `, ...}`: more keys
    text = re.sub(r"(?<![\"\w])(…|\.\.\.)(?![\"\w])", '"…"', text)
    value, _ = json.JSONDecoder().raw_decode(text.strip())
    return value


def matches(expected: object, actual: object, shown_text: str) -> bool:
    """Whether `actual` is what `expected` shows: `…` stands for any value (`[…]` any list,
    `"key": …` any value, `, …}` the remaining keys), and numbers agree to the digits
    `shown_text` writes them with."""
    digits: dict[int, int] = {}
    _decimals(expected, shown_text, digits)
    return _matches(expected, actual, digits)


def _matches(expected: object, actual: object, digits: dict[int, int]) -> bool:
    if expected in WILDCARDS:
        return True
    if isinstance(expected, list):
        if len(expected) == 1 and expected[0] in WILDCARDS:
            return isinstance(actual, list)
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_matches(e, a, digits) for e, a in zip(expected, actual, strict=True))
        )
    if isinstance(expected, dict):
        keys = set(expected) - {"…"}
        return (
            isinstance(actual, dict)
            and (keys <= set(actual) if "…" in expected else keys == set(actual))
            and all(_matches(expected[k], actual[k], digits) for k in keys)
        )
    if isinstance(expected, float) and not isinstance(actual, bool):
        shown = digits.get(id(expected), 4)
        return isinstance(actual, (int, float)) and abs(actual - expected) <= 0.51 * 10**-shown
    return expected == actual


def _decimals(value: object, text: str, found: dict[int, int]) -> None:
    """How many decimals each float of the expected JSON was written with."""
    if isinstance(value, float):
        match = re.search(rf"-?{re.escape(repr(value).rstrip('0'))}\d*", text)
        written = match.group(0) if match else repr(value)
        found[id(value)] = len(written.partition(".")[2])
    elif isinstance(value, list):
        for v in value:
            _decimals(v, text, found)
    elif isinstance(value, dict):
        for v in value.values():
            _decimals(v, text, found)


def conditioned_model(directory: Path) -> Path:
    """`sensors`, the conditioned model the examples of conditioned models name: the built-in
    model's two inputs, one output, an embedding of 4 values per stream."""
    from model import TCNConfig
    from tests.service.conftest import write_model

    config = TCNConfig(2, [8, 8], kernel_size=3, out_channels=1, embedding_dims=(4,))
    return write_model(directory / "sensors", config, seed=0)


NUMBER = re.compile(r"-?\d+\.\d+")


def same_text(shown: str, printed: str) -> bool:
    """Printed text equals the shown text, each decimal number to the last digit shown (one
    unit of it apart at most: the last digit of a float may round either way elsewhere)."""
    a, b = shown.strip().splitlines(), printed.strip().splitlines()
    if len(a) != len(b):
        return False
    for s, p in zip(a, b, strict=True):
        if NUMBER.sub("#", s) != NUMBER.sub("#", p):
            return False
        for x, y in zip(NUMBER.findall(s), NUMBER.findall(p), strict=True):
            unit = 10 ** -len(x.partition(".")[2])
            if abs(float(x) - float(y)) > unit * 1.01:
                return False
    return True
