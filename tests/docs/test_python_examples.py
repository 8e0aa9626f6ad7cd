"""The ```python blocks of README.md and docs/*.md, each run as written in a fresh interpreter
against one live `tcnserve serve --grpc-port ...` (built-in model) in an empty directory.

What an example leaves to the reader is given (`GIVEN`, defined only where a block uses the name
without defining it): `rows` and `history`, rows of the built-in model's two inputs;
`readings`, one array of rows per session; `module`, a live `pytorch_tcn.TCN`. The server also
serves `sensors`, a conditioned model (embedding_dims [4]) of the built-in model's inputs, for
the examples of conditioned models. Where a block is
followed by a ```text block, it must print that text (numbers to the digits shown); a line
`print(...)  # 3061 ...` must print the number its comment shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.docs.blocks import ROOT, Block, blocks, conditioned_model, local_addresses, same_text

GIVEN = {
    "rows": "import numpy as np\nrows = np.random.default_rng(0).random((20, 2)).round(3)",
    "history": "import numpy as np\nhistory = np.random.default_rng(1).random((10, 2)).round(3)",
    "readings": "import numpy as np\n"
    "readings = [np.random.default_rng(i).random((1 + i % 3, 2)) for i in range(1000)]",
    "module": "import pytorch_tcn\nmodule = pytorch_tcn.TCN(2, [8, 8], kernel_size=3).eval()",
}
PYTHON_BLOCKS = blocks("python")


def given_for(code: str) -> str:
    """The GIVEN lines for the names `code` reads and never assigns."""
    needed = []
    for name, definition in GIVEN.items():
        reads = re.search(rf"\b{name}\b", code)
        assigns = re.search(rf"^\s*{name}\s*=|\bfor {name}\b|\bas {name}\b", code, re.M)
        if reads and not assigns:
            needed.append(definition)
    return "\n".join(needed)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    from tests.service.conftest import free_port, serve_process

    grpc_port = free_port()
    directory = tmp_path_factory.mktemp("python-examples")
    sensors = conditioned_model(directory)
    args = ["--grpc-port", str(grpc_port), "--model", "default=builtin"]
    args += ["--model", f"sensors={sensors}"]
    with serve_process(args, directory / "serve.log") as (url, _):
        yield int(url.rsplit(":", 1)[1]), grpc_port


def test_the_python_examples_are_found():
    files = {b.file for b in PYTHON_BLOCKS}
    assert {"README.md", "docs/streaming.md", "docs/oip.md", "docs/grpc.md"} <= files


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_every_python_example_runs_and_prints_what_the_docs_show(block: Block, server, tmp_path):
    http_port, grpc_port = server
    code = local_addresses(block.text, http_port, grpc_port)
    program = f"{given_for(code)}\n{code}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{block.where} failed:\n{run.stderr[-3000:]}"
    if block.shown is not None:
        assert same_text(block.shown, run.stdout), (block.where, run.stdout)
    commented = re.findall(r"^print\(.*\)\s+#\s*(-?[\d.]+)\b", block.text, re.M)
    if commented and block.shown is None:
        printed = run.stdout.split()
        assert printed[: len(commented)] == commented, (block.where, run.stdout)
