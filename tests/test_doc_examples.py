"""The curl examples of README.md and docs/*.md, run against the built-in model as written.

Each ```bash block's `curl` commands run in order against one fresh server per file (so a
session opened by one example is there for the next); `$URL` and `localhost:8000` are that
server, `$ID` the session the file last opened (`$ID2` the one before), and a `python3 -c "..."
| curl ... -d @-` pipe sends what the Python prints. A command followed by a `# {...}` (or `# ->
{...}`) comment must answer 2xx with that JSON: `…` / `...` stand for any value, and numbers
must agree to the digits shown. A drifted output fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", "docs/service.md", "docs/oip.md", "docs/training.md"]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
WILDCARDS = ("…", "...")


def logical_lines(block: str) -> list[tuple[str, list[str]]]:
    """(command, the comment lines right after it) for each command of a bash block; a
    command continues over `\\`, an open single quote and a trailing `|`."""
    out: list[tuple[str, list[str]]] = []
    current = ""
    for line in block.splitlines():
        if current:
            current += "\n" + line
        elif line.startswith("#"):
            if out:
                out[-1][1].append(line)
            continue
        elif line.strip():
            current = line
        else:
            continue
        text = current.replace("\\\n", " ")
        if text.count("'") % 2 or text.count('"') % 2 or text.rstrip().endswith(("\\", "|")):
            continue
        out.append((text, []))
        current = ""
    return out


def expected_json(comments: list[str]) -> object | None:
    """The JSON a command's comment shows, with bare … made into wildcard strings."""
    if not comments or not re.match(r"#\s*(->\s*)?[{\[]", comments[0]):
        return None
    text = " ".join(re.sub(r"^#\s*(->\s*)?", "", c) for c in comments)
    text = re.sub(r"(?<![\"\w])(…|\.\.\.)(?![\"\w])", '"…"', text)
    value, _ = json.JSONDecoder().raw_decode(text)
    return value


def matches(expected: object, actual: object, digits: dict[int, int]) -> bool:
    if expected in WILDCARDS:
        return True
    if isinstance(expected, list):
        if len(expected) == 1 and expected[0] in WILDCARDS:
            return isinstance(actual, list)
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(matches(e, a, digits) for e, a in zip(expected, actual, strict=True))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and set(expected) == set(actual)
            and all(matches(v, actual[k], digits) for k, v in expected.items())
        )
    if isinstance(expected, float) and not isinstance(actual, bool):
        shown = digits.get(id(expected), 4)
        return isinstance(actual, (int, float)) and abs(actual - expected) <= 0.51 * 10**-shown
    return expected == actual


def decimals(value: object, text: str, found: dict[int, int]) -> None:
    """How many decimals each float of the expected JSON was written with."""
    if isinstance(value, float):
        match = re.search(rf"-?{re.escape(repr(value).rstrip('0'))}\d*", text)
        written = match.group(0) if match else repr(value)
        found[id(value)] = len(written.partition(".")[2])
    elif isinstance(value, list):
        for v in value:
            decimals(v, text, found)
    elif isinstance(value, dict):
        for v in value.values():
            decimals(v, text, found)


def curl_request(command: str, base: str, variables: dict[str, str]) -> dict:
    """The method, path, headers and body a curl command line sends."""
    parts = command.split("|")
    stdin = None
    if len(parts) == 2:  # python3 -c "..." | curl ...
        producer = shlex.split(parts[0])
        assert producer[:2] == ["python3", "-c"], producer
        stdin = subprocess.run(
            [sys.executable, "-c", producer[2]], capture_output=True, text=True, check=True
        ).stdout
    args = shlex.split(parts[-1])
    assert args[0] == "curl", args
    method, url, headers, body = None, None, {}, None
    i = 1
    while i < len(args):
        arg = args[i]
        if arg == "-X":
            method, i = args[i + 1], i + 2
        elif arg == "-H":
            name, _, value = args[i + 1].partition(":")
            headers[name.strip().lower()] = value.strip()
            i += 2
        elif arg in ("-d", "--data"):
            body = stdin if args[i + 1] == "@-" else args[i + 1]
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            url, i = arg, i + 1
    for name, value in variables.items():
        url = url.replace(f"${name}", value)
        body = body.replace(f"${name}", value) if body is not None else None
    path = re.sub(r"^(\$URL|(https?://)?localhost:8000|(https?://)?127\.0\.0\.1:8000)", "", url)
    if body is not None:
        headers.setdefault("content-type", "application/x-www-form-urlencoded")  # curl's
    return {
        "method": method or ("POST" if body is not None else "GET"),
        "url": base + path,
        "headers": headers,
        "content": body.encode() if body is not None else None,
    }


@pytest.mark.parametrize("name", FILES)
def test_every_curl_example_answers_what_the_docs_show(name):
    from service.app import create_app
    from tests.service.conftest import serving

    text = (ROOT / name).read_text()
    examples = [pair for block in BLOCK.findall(text) for pair in logical_lines(block)]
    curls = [(c, comments) for c, comments in examples if "curl " in c]
    assert curls or name == "README.md", f"{name}: no curl examples found"
    with serving(create_app()) as client:
        variables: dict[str, str] = {}
        for command, comments in curls:
            request = curl_request(command, "", variables)
            r = client.request(**request)
            shown = f"{name}: {command.strip()[:80]}"
            expected = expected_json(comments)
            assert 200 <= r.status_code < 300, (shown, r.status_code, r.text)
            actual = r.json() if r.content else None
            if isinstance(actual, dict) and "session_id" in actual and "/v1/sessions" in command:
                if "ID" in variables:
                    variables["ID2"] = variables["ID"]
                variables["ID"] = actual["session_id"]
            if expected is not None:
                digits: dict[int, int] = {}
                decimals(expected, " ".join(comments), digits)
                assert matches(expected, actual, digits), (shown, actual)
