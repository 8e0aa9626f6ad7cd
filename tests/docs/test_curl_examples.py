"""The curl examples of README.md and docs/*.md, run against the built-in model as written.

Each ```bash block's `curl` commands run in order against one fresh server per file (so a
session opened by one example is there for the next); `$URL` and `localhost:8000` are that
server, `$ID` the session the file last opened (`$ID2` the one before), and a `python3 -c "..."
| curl ... -d @-` pipe sends what the Python prints. A command followed by a `# {...}` (or `# ->
{...}`) comment, or a block whose last command is followed by a ```json block, must answer 2xx
with that JSON: `…` / `...` stand for any value, and numbers must agree to the digits shown. A
drifted output fails here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.docs.blocks import blocks, commands, expected_json, matches, shown_json

CURL_FILES = sorted(
    {b.file for b in blocks("bash") if any("curl " in c for c, _ in commands(b.text))}
)


def curl_request(command: str, variables: dict[str, str]) -> dict:
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
        elif arg in ("-s", "--silent", "-S", "-f", "--fail"):
            i += 1
        elif arg.startswith("-"):
            raise AssertionError(f"curl option {arg} is not understood here: {command}")
        else:
            url, i = arg, i + 1

    def expand(text: str) -> str:  # $ID and $ID2 alike: whole names only
        return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), text)

    url = expand(url)
    body = expand(body) if body is not None else None
    path = re.sub(r"^(\$URL|(https?://)?localhost:8000|(https?://)?127\.0\.0\.1:8000)", "", url)
    unset = re.findall(r"\$\w+", path + (body or ""))
    assert not unset, f"{unset} set by no earlier example: {command}"
    if body is not None:
        headers.setdefault("content-type", "application/x-www-form-urlencoded")  # curl's
    return {
        "method": method or ("POST" if body is not None else "GET"),
        "url": path,
        "headers": headers,
        "content": body.encode() if body is not None else None,
    }


def test_the_curl_examples_are_found():
    assert {"README.md", "docs/service.md", "docs/oip.md", "docs/training.md"} <= set(CURL_FILES)


@pytest.mark.parametrize("name", CURL_FILES)
def test_every_curl_example_answers_what_the_docs_show(name):
    from service.app import create_app
    from tests.service.conftest import serving

    examples = []
    for block in (b for b in blocks("bash") if b.file == name):
        found = [(c, comments) for c, comments in commands(block.text) if "curl " in c]
        if found and block.shown is not None and block.file and not found[-1][1]:
            found[-1] = (found[-1][0], ["#"], block.shown)  # the ```json block shows its answer
        examples += found
    with serving(create_app()) as client:
        variables: dict[str, str] = {}
        for command, comments, *shown in examples:
            request = curl_request(command, variables)
            r = client.request(**request)
            where = f"{name}: {command.strip()[:80]}"
            assert 200 <= r.status_code < 300, (where, r.status_code, r.text)
            actual = r.json() if r.content else None
            if request["method"] == "POST" and request["url"] == "/v1/sessions":  # opened one
                if "ID" in variables:
                    variables["ID2"] = variables["ID"]
                variables["ID"] = actual["session_id"]
            if shown:
                expected, text = shown_json(shown[0]), shown[0]
            else:
                expected, text = expected_json(comments), " ".join(comments)
            if expected is not None:
                assert matches(expected, actual, text), (where, actual)
            else:  # /v1/steps answers 200 with per-item errors: an example shows none unasked
                failed = [i for i in (actual or {}).get("results", []) if "error" in i]
                assert not failed, (where, failed)
