"""`tcnserve predict` and `tcnserve stream` against a real server: CSV/NPY/stdin in, CSV out."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from service.cli import main
from service.client import RetryPolicy
from tests.client.conftest import KEY, rows_of
from tests.service.test_serve_process import free_port


def printed(out: str) -> np.ndarray:
    return np.loadtxt(io.StringIO(out), delimiter=",", ndmin=2)


def assert_printed(out: str, expected: np.ndarray) -> None:
    # Printed with 7 significant digits.
    np.testing.assert_allclose(printed(out), expected, rtol=1e-6, atol=1e-5)


def csv_text(rows: np.ndarray) -> str:
    return "\n".join(",".join(repr(float(v)) for v in row) for row in rows) + "\n"


@pytest.fixture
def no_backoff(monkeypatch) -> list[int]:
    """Retry delays become 0 (the attempts still happen); returns the attempts waited after."""
    waited: list[int] = []

    def delay(self, attempt, reply=None):
        waited.append(attempt)
        return 0.0

    monkeypatch.setattr(RetryPolicy, "delay", delay)
    return waited


def test_predict_csv_prints_the_outputs(live, reference, tmp_path, capsys):
    x = rows_of(45, seed=21)
    path = tmp_path / "rows.csv"
    path.write_text("# a comment, then a blank line\n\n" + csv_text(x))
    assert main(["predict", "--url", live.url, "--api-key", KEY, "--model", "tiny", str(path)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 45
    assert_printed(out, reference("tiny", x))


def test_predict_npy_last(live, reference, tmp_path, capsys):
    x = rows_of(33, seed=22)
    path = tmp_path / "rows.npy"
    np.save(path, x)
    argv = ["predict", "--url", live.url, "--api-key", KEY, "--model", "tiny", "--last"]
    assert main([*argv, str(path)]) == 0
    assert_printed(capsys.readouterr().out, reference("tiny", x)[-1:])


@pytest.mark.parametrize(
    "options", [[], ["--json"], ["--chunk", "4"], ["--json", "--chunk", "4"]], ids=str
)
def test_stream_npy_prints_one_line_per_row(live, reference, tmp_path, capsys, options):
    x = rows_of(30, seed=23)
    path = tmp_path / "rows.npy"
    np.save(path, x)
    session_id = "cli-stream-session-1"
    argv = ["stream", "--url", live.url, "--api-key", KEY, "--model", "tiny"]
    assert main([*argv, "--session-id", session_id, *options, str(path)]) == 0
    assert_printed(capsys.readouterr().out, reference("tiny", x))
    # The session was closed at the end: the same id can be opened again.
    assert main([*argv, "--session-id", session_id, str(path)]) == 0


@pytest.mark.parametrize("json_frames", [False, True], ids=["binary", "json"])
def test_stream_reads_csv_from_stdin(live, reference, monkeypatch, capsys, json_frames):
    x = rows_of(25, seed=24)
    monkeypatch.setattr("sys.stdin", io.StringIO(csv_text(x)))
    monkeypatch.setenv("TCNSERVE_API_KEY", KEY)  # the --api-key default
    argv = ["stream", "--url", live.url, "--model", "tiny", *(["--json"] if json_frames else [])]
    assert main([*argv, "-"]) == 0
    assert_printed(capsys.readouterr().out, reference("tiny", x))


def test_token_model_from_stdin(live, reference, monkeypatch, capsys):
    ids = np.random.default_rng(25).integers(0, 7, size=20)
    want = reference("tokens", ids)
    text = "\n".join(str(i) for i in ids) + "\n"
    for command in ("predict", "stream"):
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
        argv = [command, "--url", live.url, "--api-key", KEY, "--model", "tokens", "-"]
        assert main(argv) == 0
        assert_printed(capsys.readouterr().out, want)


def test_nothing_listening_fails_at_once_and_says_so(no_backoff, tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text(csv_text(rows_of(3, seed=26)))
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["predict", "--url", url, str(path)]) == 2
    assert main(["stream", "--url", url, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count(f"connection refused: is the server running at {url}?") == 2
    assert no_backoff == []  # no silent retries


def test_a_header_or_an_empty_file_is_explained(live, tmp_path, capsys):
    argv = ["--url", live.url, "--api-key", KEY, "--model", "tiny"]
    header, empty = tmp_path / "header.csv", tmp_path / "empty.csv"
    header.write_text("value,marker\n0.5,1\n")
    empty.write_text("# nothing yet\n\n")
    assert main(["predict", *argv, str(header)]) == 2
    assert "a header line?" in capsys.readouterr().err
    assert main(["predict", *argv, str(empty)]) == 2
    assert f"{empty}: no rows" in capsys.readouterr().err


def test_a_closed_stdout_ends_quietly(live, tmp_path, capsys, monkeypatch):
    path = tmp_path / "rows.csv"
    path.write_text(csv_text(rows_of(5, seed=29)))

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("service.commands.client._write", closed)
    argv = ["--url", live.url, "--api-key", KEY, "--model", "tiny", str(path)]
    assert main(["predict", *argv]) == 0
    assert "Broken pipe" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-key", "wrong-key-0123456789abcdef"], "error: 401 unauthorized"),
        ([], "TCNSERVE_API_KEY"),  # no key: the message says how to give one
        (["--api-key", KEY, "--model", "nope"], "error: 404"),
    ],
)
def test_server_errors_exit_2(live, tmp_path, capsys, argv, message):
    path = tmp_path / "rows.csv"
    path.write_text(csv_text(rows_of(3, seed=27)))
    for command in ("predict", "stream"):
        assert main([command, "--url", live.url, *argv, str(path)]) == 2
        assert message in capsys.readouterr().err


def test_a_bad_row_names_its_line(live, tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text("1.0,2.0\n1.0,oops\n")
    argv = ["--url", live.url, "--api-key", KEY, "--model", "tiny", str(path)]
    for command in ("predict", "stream"):
        assert main([command, *argv]) == 2
        assert f"error: {path}:2: not a row of numbers: '1.0,oops'" in capsys.readouterr().err


def test_a_url_without_scheme_fails_at_once_with_the_reason(no_backoff, tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text(csv_text(rows_of(3, seed=28)))
    assert main(["predict", "--url", "127.0.0.1:8000", str(path)]) == 2
    assert "http://" in capsys.readouterr().err
    assert no_backoff == []


def test_ragged_rows_and_headers_are_named_by_line(live, reference, tmp_path, capsys):
    argv = ["--url", live.url, "--api-key", KEY, "--model", "tiny"]
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1.0,2.0\n0.5,0.5\n1.0\n")
    assert main(["predict", *argv, str(ragged)]) == 2
    err = capsys.readouterr().err
    assert f"{ragged}:3: 1 values, but the rows before have 2" in err and "Traceback" not in err
    header = tmp_path / "header.csv"
    x = rows_of(4, seed=31)
    header.write_text("value,marker\n" + csv_text(x))
    assert main(["predict", *argv, "--skip-header", str(header)]) == 0
    assert_printed(capsys.readouterr().out, reference("tiny", x))


def test_the_url_comes_from_tcnserve_url(live, reference, tmp_path, capsys, monkeypatch):
    x = rows_of(3, seed=32)
    path = tmp_path / "rows.csv"
    path.write_text(csv_text(x))
    monkeypatch.setenv("TCNSERVE_URL", live.url)
    assert main(["predict", "--api-key", KEY, "--model", "tiny", str(path)]) == 0
    assert_printed(capsys.readouterr().out, reference("tiny", x))


def test_ctrl_c_ends_quietly_with_130(monkeypatch, capsys):
    from service.commands import client as client_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(client_command, "run", interrupted)
    assert main(["predict", "rows.csv"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("tcnserve")


def test_a_sequence_too_long_to_predict_points_at_stream(live, tmp_path, capsys):
    path = tmp_path / "long.csv"
    path.write_text(csv_text(rows_of(6000, seed=29)))  # a body over the server's 64 KiB
    assert main(["predict", "--url", live.url, "--api-key", KEY, "--model", "tiny", str(path)]) == 2
    err = capsys.readouterr().err
    assert "413" in err and "(stream a sequence this long with `tcnserve stream`)" in err


def test_rows_from_a_terminal_are_asked_for(live, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(csv_text(rows_of(4, seed=30))))
    assert main(["predict", "--url", live.url, "--api-key", KEY, "--model", "tiny"]) == 0
    err = capsys.readouterr().err
    assert "reading rows from standard input, one comma-separated timestep per line" in err
