"""Every command line of README.md's and docs/*.md's ```bash blocks, run (or, where it cannot run
here, checked) as written.

- `tcnserve ...` commands run in an empty directory holding what the command names as given:
  a checkpoint directory (a copy of the built-in model) for `--model name=DIR`; for `convert`,
  an input that is what the command says it is (a pytorch-tcn TCN built with the keyword
  arguments it states, a locuslab/TCN state_dict for `--format locuslab`/`auto`, a keras-tcn
  model saved by real keras-tcn for `.keras`); rows files for `predict` and `stream`.
- `serve` must become ready and exit 0 on SIGTERM; `predict`/`stream` must answer from a live
  server (the built-in model, and `sensors`: tests/docs/blocks.py `conditioned_model`);
  `convert` must write a checkpoint; `train` runs with its budget cut to seconds (`--max-minutes`,
  `--val-size`, `--test-size` appended: argparse takes the last).
- Addresses are made the test's own: `--port`/`--grpc-port` appended, a `redis://` store and
  `--url` pointed at servers the test starts, `TCNSERVE_URL` for a command with no `--url`.
- `--device cuda` runs only where CUDA is; `python bench/...` benchmarks (minutes each) are
  parsed by their own argparse and stopped there; anything else must be in ELSEWHERE, which
  names the script or test that runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.docs.blocks import ROOT, blocks, commands, conditioned_model, local_addresses

ELSEWHERE = {  # command prefix -> what runs it
    "python3 -m venv .venv &&": ".ci/run",  # the README's two setup commands
    "python3 -m venv .venv-client": "tests/client/test_client_only_install.py",
    "docker ": "scripts/container_check.sh",  # the same image, built and run with podman
    "bash scripts/install_perf_analyzer.sh": ".ci/run",
}
BUILTIN = ROOT / "service" / "default_model"
PERF_ANALYZER = os.environ.get("TCNSERVE_PERF_ANALYZER") or shutil.which("perf_analyzer")


def all_commands() -> list[tuple[str, str]]:
    """(where, command) for each command of a ```bash block; the same command written in two
    places is run once, under the first place."""
    found: list[tuple[str, str]] = []
    for block in blocks("bash"):
        for command, _ in commands(block.text):
            if "curl " in command or re.fullmatch(r"\w+=\S*\s*(#.*)?", command):
                continue  # curl: tests/docs/test_curl_examples.py; `ID=…`: a shell variable
            command = without_comment(command)
            if all(command != seen for _, seen in found):
                found.append((block.where, command))
    return found


def without_comment(command: str) -> str:
    """The command up to a `#` that starts a shell comment (outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].strip()
    return command.strip()


COMMANDS = all_commands()
TCNSERVE = [(w, c) for w, c in COMMANDS if re.match(r"(\w+=\S+ )*(cat \S+ \| )?\S*tcnserve ", c)]
BENCH = [(w, c) for w, c in COMMANDS if c.startswith("python bench/")]
PERF = [(w, c) for w, c in COMMANDS if c.startswith(".perf_analyzer/perf_analyzer")]


def split(command: str) -> tuple[dict[str, str], str | None, list[str]]:
    """(environment assignments, the file piped in, the tcnserve argv)."""
    env, stdin = {}, None
    words = shlex.split(command.removesuffix("&").strip())
    while re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[0] == "cat":
        stdin, words = words[1], words[3:]
    assert words[0].endswith("tcnserve"), words
    return env, stdin, words[1:]


def test_every_command_is_run_or_named():
    assert len(TCNSERVE) >= 20 and BENCH and PERF
    for where, command in COMMANDS:
        if (where, command) in TCNSERVE + BENCH + PERF:
            continue
        runner = next((r for prefix, r in ELSEWHERE.items() if command.startswith(prefix)), None)
        assert runner is not None, f"{where}: nothing runs `{command}`: add it here or to ELSEWHERE"
        assert (ROOT / runner).exists(), runner


@pytest.mark.parametrize(("where", "command"), TCNSERVE, ids=[f"{w} {c[:60]}" for w, c in TCNSERVE])
def test_every_tcnserve_command_parses(where, command):
    from service.cli import build_parser

    _, _, argv = split(command)
    try:
        build_parser(argv[0]).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` does not parse (exit {e.code})")


# ----- running them ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.service.conftest import serve_process

    directory = tmp_path_factory.mktemp("cli-examples")
    args = ["--model", "default=builtin", "--model", f"sensors={conditioned_model(directory)}"]
    with serve_process(args, directory / "serve.log") as (url, _):
        yield url


def given(argv: list[str], cwd: Path) -> None:
    """Put what `argv` names as its input into cwd."""
    for i, word in enumerate(argv):
        if argv[i - 1] == "--model" and "=" in word and word.split("=", 1)[1] != "builtin":
            shutil.copytree(BUILTIN, cwd / word.split("=", 1)[1], dirs_exist_ok=True)
    if argv[0] in ("predict", "stream"):
        rows = np.random.default_rng(0).random((12, 2)).round(3)
        np.save(cwd / "rows.npy", rows)
        for name in ("rows.csv", "seq.csv"):
            np.savetxt(cwd / name, rows, delimiter=",", fmt="%.3f")
    if argv[0] == "convert":
        convert_input(argv, cwd / argv[1])


def convert_input(argv: list[str], path: Path) -> None:
    import torch

    if path.suffix == ".keras":
        shutil.copy(ROOT / "tests/model/fixtures/keras_tcn/skips_relu.keras", path)
    elif "--pytorch-tcn-kwargs" in argv:
        import pytorch_tcn

        kwargs = json.loads(argv[argv.index("--pytorch-tcn-kwargs") + 1])
        torch.save(pytorch_tcn.TCN(2, [8, 8], kernel_size=3, **kwargs).state_dict(), path)
    else:  # --format locuslab, or auto
        from tests.model.locuslab_reference import PaperSequenceModel, randomize_

        torch.save(randomize_(PaperSequenceModel(2, [8, 8], 3, 1), seed=0).state_dict(), path)


def run_env(env: dict[str, str], url: str | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TCNSERVE_")}
    base["PYTHONPATH"] = str(ROOT)
    return {**base, **env, **({"TCNSERVE_URL": url} if url else {})}


def tcnserve(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "service.cli", *argv]


RUNS = [
    pytest.param(w, c, id=f"{w} {c[:60]}", marks=[pytest.mark.cuda] if "cuda" in c else [])
    for w, c in TCNSERVE
]


@pytest.mark.parametrize(("where", "command"), RUNS)
def test_every_tcnserve_command_runs(where, command, tmp_path, request):
    env, stdin, argv = split(command)
    given(argv, tmp_path)
    if argv[0] == "serve":
        return serves(where, env, argv, tmp_path)
    url = None
    if argv[0] in ("predict", "stream"):
        url = request.getfixturevalue("live")
        argv = shlex.split(local_addresses(shlex.join(argv), int(url.rsplit(":", 1)[1])))
    if argv[0] == "train":
        argv += ["--max-minutes", "0.01", "--val-size", "8", "--test-size", "8", "--no-progress"]
    run = subprocess.run(
        tcnserve(argv),
        cwd=tmp_path,
        env=run_env(env, url),
        stdin=(tmp_path / stdin).open() if stdin else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{where}: `{command}` exit {run.returncode}:\n{run.stderr[-2000:]}"
    if argv[0] in ("predict", "stream"):
        assert len(run.stdout.splitlines()) == 12, run.stdout  # one output line per row
    if argv[0] in ("convert", "train"):
        out = tmp_path / (argv[2] if argv[0] == "convert" else argv[argv.index("--out") + 1])
        assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def serves(where: str, env: dict[str, str], argv: list[str], cwd: Path) -> None:
    """`tcnserve serve ...` becomes ready on the port the test gives it and exits 0 on SIGTERM."""
    import torch

    from tests.service.conftest import free_port, redis_server, stop_process, wait_ready

    if "cuda" in argv and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA here (scripts/cuda_checks.sh runs it: -m cuda)")
    port = free_port()
    argv = [*argv, "--port", str(port)]
    if "--grpc-port" in argv:
        argv += ["--grpc-port", str(free_port())]
    store = any(w.startswith("redis://") for w in argv)
    with redis_server(cwd) if store else contextlib.nullcontext() as r:
        argv = [r if r and w.startswith("redis://") else w for w in argv]
        with (cwd / "serve.log").open("w") as log:
            process = subprocess.Popen(
                tcnserve(argv), cwd=cwd, env=run_env(env), stdout=log, stderr=subprocess.STDOUT
            )
            try:
                wait_ready(f"http://127.0.0.1:{port}", process)
                process.send_signal(signal.SIGTERM)
                assert process.wait(60) == 0, (where, (cwd / "serve.log").read_text()[-2000:])
            finally:
                stop_process(process)


@pytest.mark.parametrize(("where", "command"), BENCH, ids=[f"{w} {c}" for w, c in BENCH])
def test_every_benchmark_command_parses(where, command):
    """A benchmark runs for minutes: its own parser reads the documented flags, then it stops."""
    argv = shlex.split(command)[1:]
    stop_after_parsing = (
        "import argparse, runpy, sys\n"
        "parse = argparse.ArgumentParser.parse_args\n"
        "def parsed(self, *a, **k):\n"
        "    parse(self, *a, **k)\n"
        "    sys.exit(0)\n"
        "argparse.ArgumentParser.parse_args = parsed\n"
        f"sys.argv = {argv!r}\n"
        f"sys.path.insert(0, {str(ROOT / Path(argv[0]).parent)!r})\n"
        f"runpy.run_path({argv[0]!r}, run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", stop_after_parsing],
        cwd=ROOT,
        env=run_env({}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"{where}: `{command}`:\n{run.stderr[-2000:]}"


@pytest.mark.skipif(not PERF_ANALYZER, reason="no perf_analyzer (docs/oip.md: how to install)")
@pytest.mark.parametrize(("where", "command"), PERF, ids=[w for w, _ in PERF])
def test_the_perf_analyzer_command_runs(where, command, live):
    argv = shlex.split(local_addresses(command, int(live.rsplit(":", 1)[1])))
    argv[0] = PERF_ANALYZER
    argv += ["--measurement-mode", "count_windows", "--measurement-request-count", "40"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"{where}:\n{run.stdout[-2000:]}{run.stderr[-2000:]}"


# (built with, stated): the conversions whose refusals docs/bring_your_own_model.md shows (skip
# connections between blocks of two widths: the weights hold their 1x1 convs)
REFUSALS = [
    ({"activation": "softmax"}, {"activation": "softmax"}),
    ({"num_channels": [8, 16], "use_skip_connections": True}, {"use_skip_connections": False}),
    ({"use_norm": "batch_norm"}, {"use_norm": "weight_norm"}),
    ({}, None),
]


def test_the_refusals_shown_are_what_convert_says(tmp_path):
    import pytorch_tcn
    import torch

    block = next(b for b in blocks("") if b.text.startswith("error: "))
    shown = block.text.strip().splitlines()
    assert len(shown) == len(REFUSALS), block.where
    for i, ((built, stated), line) in enumerate(zip(REFUSALS, shown, strict=True)):
        path = tmp_path / f"model{i}.pt"
        module = pytorch_tcn.TCN(2, **{"num_channels": [8, 8], "kernel_size": 3, **built})
        torch.save(module.state_dict(), path)
        argv = ["convert", str(path), str(tmp_path / f"out{i}"), "--format", "pytorch-tcn"]
        if stated is not None:
            argv += ["--pytorch-tcn-kwargs", json.dumps(stated)]
        run = subprocess.run(tcnserve(argv), env=run_env({}), capture_output=True, text=True)
        assert run.returncode == 2, (argv, run.stderr)
        assert run.stderr.strip().splitlines()[-1] == line, (block.where, run.stderr)
