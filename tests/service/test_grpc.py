"""The Open Inference Protocol over gRPC (service/grpc/, docs/grpc.md).

The real clients' cases are in tests/service/grpc_clients.py, and run here in a pytest process
of their own: tritonclient.grpc's messages and KServe's both claim the `inference.*` names in
protobuf's process-wide registry, so no process can import both, and
tests/service/test_oip_kserve.py imports KServe into this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]


def test_the_real_clients_cases_pass_in_a_process_of_their_own():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
         str(ROOT / "tests" / "service" / "grpc_clients.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy(),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]


def test_the_generated_messages_are_current(tmp_path):
    from grpc_tools import protoc

    source = ROOT / "service" / "grpc"
    assert (
        protoc.main(["", f"-I{source}", f"--python_out={tmp_path}", str(source / "oip.proto")]) == 0
    )
    assert (tmp_path / "oip_pb2.py").read_text() == (source / "oip_pb2.py").read_text(), (
        "service/grpc/oip_pb2.py is stale: regenerate it (the command is in oip.proto)"
    )


def test_every_error_code_has_a_grpc_status():
    from service.protocol import error_codes

    assert error_codes.GRPC_STATUS.keys() == error_codes.STATUS.keys()
    assert all(hasattr(grpc.StatusCode, name) for name in error_codes.GRPC_STATUS.values())


def test_the_docs_list_every_rpc_and_the_numbers_the_server_uses():
    import re

    from service.grpc import server

    text = (ROOT / "docs" / "grpc.md").read_text()
    table = text[text.index("## RPCs") : text.index("Keys travel")]
    assert re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE) == [*server.UNARY, server.STREAMING]
    prose = " ".join(text.split())
    assert f"At most {server.STREAM_INFLIGHT} requests of one call are in progress" in prose
    assert f"gives the calls in progress {server.STOP_GRACE_S:g} s to finish" in prose
    assert f"Idle connections are pinged every {server.KEEPALIVE_MS // 1000} s" in prose
