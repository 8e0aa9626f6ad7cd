"""The `tcnserve` command line: each subcommand lives in its own module under commands/."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from types import FrameType

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.commands.serve", "start the HTTP/WebSocket server"),
    "convert": ("service.commands.convert", "convert a locuslab/TCN, pytorch-tcn, keras-tcn model"),
    "train": ("service.commands.train", "train a TCN on one of the paper's synthetic tasks"),
    "predict": ("service.commands.client", "send a whole sequence file to a server"),
    "stream": ("service.commands.client", "stream rows to a server session, print outputs"),
}


def installed_version() -> str:
    for distribution in ("tcnserve", "tcnserve-client"):
        try:
            return f"{distribution} {version(distribution)}"
        except PackageNotFoundError:
            continue
    return "tcnserve (not installed: run from a checkout)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; only `command`'s module is imported (the client needs no torch). The
    commands this install lacks (the client alone has no server) are not listed."""
    parser = argparse.ArgumentParser(prog="tcnserve", description=__doc__)
    parser.add_argument("--version", action="version", version=installed_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command and importlib.util.find_spec(module_name) is None:
            continue
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = _import_command(name, module_name)
            module.add_arguments(cmd, name)
            cmd.set_defaults(_run=module.run)
    return parser


def _import_command(name: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a missing dependency of an installed command: a real error
            raise
        sys.exit(
            f"tcnserve {name}: not in this install. This is the client alone (tcnserve-client: "
            "predict and stream); the server's commands come with the full project: "
            "pip install torch==2.13.0 tcnserve (see README)"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        with _quiet_ctrl_c_while_importing():
            args = build_parser(command).parse_args(argv)  # imports the command's modules
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, as shells expect (128 + SIGINT)
        print("interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _quiet_ctrl_c_while_importing() -> Iterator[None]:
    """Ctrl-C while the command's modules import ends the process at once with 130: raised
    inside an import, KeyboardInterrupt can come out as another error (pydantic's schema
    builder wraps it), a traceback instead of a quiet exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: FrameType | None) -> None:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
