"""Deployment files: the nginx consistent-hash config (syntax and a real two-pod run on
loopback, skipped without nginx), the Kubernetes manifests and the Dockerfile's install steps."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import assert_rows_close, random_rows
from tests.service.test_serve_process import free_port, serve_command, wait_ready

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def render_nginx_conf(directory: Path, listen_port: int, backends: list[int]) -> Path:
    """deploy/nginx.conf with loopback servers and paths under `directory`.

    Only what cannot run here changes: the pods' DNS names (and `resolve`, which needs
    nginx >= 1.27.3), the listen port and the pid/log/temp paths; the routing is untouched.
    """
    text = (DEPLOY / "nginx.conf").read_text()
    servers = "".join(f"        server 127.0.0.1:{port};\n" for port in backends)
    text, n = re.subn(
        r"( *# servers: begin\n).*?( *# servers: end\n)", rf"\g<1>{servers}\g<2>", text, flags=re.S
    )
    assert n == 1
    text = re.sub(r"\n *resolver [^;]*;", "", text)
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    text = text.replace("/tmp/", f"{directory}/").replace("/dev/stdout", f"{directory}/access.log")
    text = text.replace("/dev/stderr", f"{directory}/error.log")
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


@needs_nginx
def test_nginx_config_syntax(tmp_path):
    conf = render_nginx_conf(tmp_path, free_port(), [free_port(), free_port()])
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@needs_nginx
@pytest.mark.slow
def test_sessions_stay_on_their_pod_behind_nginx(tmp_path, tiny_dir):
    """Two tcnserve processes behind the proxy: every push of every session reaches its pod."""
    ports = [free_port(), free_port()]
    proxy_port = free_port()
    processes = []
    try:
        for port in ports:
            log = (tmp_path / f"tcnserve-{port}.log").open("w")
            processes.append(
                subprocess.Popen(
                    [*serve_command(), "--port", str(port), "--model", f"tiny={tiny_dir}"],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for port, process in zip(ports, processes, strict=True):
            wait_ready(f"http://127.0.0.1:{port}", process)
        conf = render_nginx_conf(tmp_path, proxy_port, ports)
        nginx = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(tmp_path),
                "-c",
                str(conf),
                "-e",
                str(tmp_path / "error.log"),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(nginx)
        url = f"http://127.0.0.1:{proxy_port}"
        wait_ready(url, nginx)
        rows = random_rows(12, seed=40)
        with httpx.Client(base_url=url, timeout=30) as c:
            sessions = []
            for i in range(16):
                # Half choose their id (sent as X-Session-ID), half let the proxy choose one.
                headers = {"X-Session-ID": f"client-chosen-{i:04d}"} if i % 2 else {}
                r = c.post(
                    "/v1/sessions", json={"model": "tiny", "prefix": rows[:2]}, headers=headers
                )
                assert r.status_code == 201, r.text
                sessions.append((r.json()["session_id"], r.json()["outputs"]))
            assert sessions[1][0] == "client-chosen-0001"
            want = c.post("/v1/models/tiny/predict", json={"inputs": [rows]}).json()["outputs"][0]
            for position in range(2, 12, 2):
                for sid, outputs in sessions:
                    r = c.post(
                        f"/v1/sessions/{sid}/steps",
                        json={"inputs": rows[position : position + 2], "offset": position},
                    )
                    assert r.status_code == 200, r.text  # a 404 would mean the wrong pod
                    outputs += r.json()["outputs"]
            for _, outputs in sessions:
                assert_rows_close(outputs, want)
            for sid, _ in sessions:
                assert c.get(f"/v1/sessions/{sid}").json()["position"] == 12
            # /v2 sequences: the proxy routes each request by its X-Session-ID, the sequence's
            # session id (docs/oip.md); an "unknown sequence" 400 would mean the wrong pod.
            for n in range(1, 9):
                outputs, route = [], {"X-Session-ID": f"oip-int-{n}"}
                for start in range(0, 12, 3):
                    flags = {"sequence_start": start == 0, "sequence_end": start == 9}
                    data = [v for row in rows[start : start + 3] for v in row]
                    tensor = {"name": "input", "shape": [1, 3, 2], "datatype": "FP32"}
                    body = {
                        "parameters": {"sequence_id": n, **flags},
                        "inputs": [{**tensor, "data": data}],
                    }
                    r = c.post("/v2/models/tiny/infer", json=body, headers=route)
                    assert r.status_code == 200, r.text
                    outputs += np.reshape(r.json()["outputs"][0]["data"], (3, 2)).tolist()
                assert_rows_close(outputs, want)
        counts = []
        for port in ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            match = re.search(r'tcnserve_active_sessions\{model="tiny"\} (\S+)', text)
            counts.append(float(match.group(1)))
        assert sum(counts) == 16
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(
                    signal.SIGTERM if process is not processes[-1] else signal.SIGQUIT
                )
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def test_manifests_agree_with_the_proxy_config():
    yaml = pytest.importorskip("yaml")
    docs = [
        doc
        for name in ("tcnserve.yaml", "proxy.yaml", "kustomization.yaml")
        for doc in yaml.safe_load_all((DEPLOY / name).read_text())
    ]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs if "metadata" in d}
    assert ("StatefulSet", "tcnserve") in kinds and ("Deployment", "tcnserve-proxy") in kinds
    statefulset = next(d for d in docs if d.get("kind") == "StatefulSet")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve"] and "--workers" not in " ".join(container["args"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    conf = (DEPLOY / "nginx.conf").read_text()
    assert "hash $tcnserve_route_key consistent;" in conf
    servers = re.findall(r"server (tcnserve-\d+)\.tcnserve\.(\w+)\.svc", conf)
    kustomization = next(d for d in docs if d.get("kind") == "Kustomization")
    assert [name for name, _ in servers] == [
        f"tcnserve-{i}" for i in range(statefulset["spec"]["replicas"])
    ]
    assert {ns for _, ns in servers} == {kustomization["namespace"]}


def test_dockerfile_installs_like_the_readme():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    pin = re.search(r"torch==([\d.]+)", ci).group(1)
    assert f"ARG TORCH_VERSION={pin}" in dockerfile
    assert "pip install" in dockerfile and "torch==${TORCH_VERSION}" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert re.search(r"^USER (?!root)", dockerfile, re.M)
    instructions = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert not any("--workers" in line for line in instructions)
    assert (ROOT / ".dockerignore").is_file()
