"""The client alone (client/, the tcnserve-client distribution): built into a wheel, installed in
a fresh venv, and used against a real server while torch and the server's libraries cannot be
imported, so any import of them by the client fails the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import httpx
import numpy as np
import pytest

from tests.client.conftest import KEY, rows_of
from tests.service.conftest import ROOT

pytestmark = pytest.mark.slow
# The server's dependencies, the model layer and the server's own modules: none may be imported.
BLOCKED = [
    "torch", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "safetensors",
    "prometheus_client", "msgspec", "model", "service.app", "service.models.registry",
]  # fmt: skip
CLIENT_FILES = {
    "service/cli.py",
    "service/protocol/__init__.py",
    "service/protocol/error_codes.py",
    "service/protocol/wire.py",
    "service/client/__init__.py",
    "service/client/aio.py",
    "service/client/protocol.py",
    "service/client/sync.py",
    "service/commands/__init__.py",
    "service/commands/client.py",
}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> tuple:
    """(the venv's python, the wheel's .py files): the wheel built offline and installed alone."""
    tmp = tmp_path_factory.mktemp("client-only")
    source = tmp / "client"  # links followed: the wheel gets the files themselves
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    quiet = {"check": True, "capture_output": True, "text": True, "timeout": 300}
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(source)], **quiet)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("tcnserve_client-*.whl")
    files = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **quiet)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], **quiet)  # fmt: skip
    return python, files


def run_blocked(python, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in the client's venv with this venv's numpy, httpx, websockets and tqdm on the
    path (the client's own dependencies) and every server module blocked."""
    prelude = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {BLOCKED!r}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"the client imported {{name}}, a server module")
                return None

        sys.meta_path.insert(0, Blocker())
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        sys.path.append({sysconfig.get_paths()["platlib"]!r})
        """
    )
    return subprocess.run(
        [str(python), "-I", "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_wheel_holds_the_client_and_nothing_of_the_server(client_venv):
    _, files = client_venv
    assert files == CLIENT_FILES


def test_the_client_alone_predicts_and_streams_without_torch(client_venv, live, tmp_path):
    python, _ = client_venv
    rows = rows_of(12, seed=3)
    csv = tmp_path / "rows.csv"
    csv.write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n")
    code = """
        import contextlib, io, json, sys
        import numpy as np
        import service.client
        from service.cli import main

        assert service.client.__file__.startswith(sys.prefix), service.client.__file__
        url, key, csv = sys.argv[1:]
        with service.client.Client(url, key) as client:
            predicted = client.predict("tiny", [np.loadtxt(csv, delimiter=",", ndmin=2)])[0]
            with client.open_session("tiny") as session:
                streamed = np.concatenate([session.push(r[None]) for r in np.loadtxt(csv, delimiter=",", ndmin=2)])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["predict", "--url", url, "--api-key", key, "--model", "tiny", "--quiet", csv])
        print(json.dumps({"predicted": predicted.tolist(), "streamed": streamed.tolist(),
                          "cli": out.getvalue(), "code": code, "torch": "torch" in sys.modules}))
    """  # noqa: E501
    result = run_blocked(python, code, live.url, KEY, str(csv))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["code"] == 0 and answer["torch"] is False
    exact = httpx.post(
        f"{live.url}/v1/models/tiny/predict",
        json={"inputs": [np.round(rows, 6).tolist()]},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()["outputs"][0]
    np.testing.assert_allclose(answer["predicted"], exact, atol=1e-5, rtol=0)
    np.testing.assert_allclose(answer["streamed"], exact, atol=1e-5, rtol=0)
    cli_rows = [[float(v) for v in line.split(",")] for line in answer["cli"].split()]
    np.testing.assert_allclose(cli_rows, exact, atol=1e-4, rtol=0)


def test_the_blocker_catches_a_torch_import(client_venv):
    # The check above is only worth something if importing torch really fails there.
    python, _ = client_venv
    result = run_blocked(python, "import torch")
    assert result.returncode != 0 and "the client imported torch" in result.stderr


def test_the_client_only_cli_says_where_the_server_is(client_venv):
    python, _ = client_venv
    tcnserve = python.parent / "tcnserve"  # the console script, run by the venv's own python
    help_text = subprocess.run([str(tcnserve), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "predict" in help_text.stdout
    assert "convert" not in help_text.stdout  # the commands this install lacks are not listed
    assert (
        "tcnserve-client"
        in subprocess.run([str(tcnserve), "--version"], capture_output=True, text=True).stdout
    )
    serve = subprocess.run([str(tcnserve), "serve"], capture_output=True, text=True)
    assert serve.returncode == 1
    assert "the client alone (tcnserve-client" in serve.stderr
