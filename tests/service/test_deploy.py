"""Deployment files: the Kubernetes manifests' invariants and the Dockerfile's install steps.
The proxy config itself runs, as deployed, in tests/service/test_rolling_update.py."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from service.commands.serve import FLAGS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UVICORN_GRACEFUL_S = 30  # service/commands/serve.py: timeout_graceful_shutdown
DUMP_BUDGET_S = 5  # writing 1,000 sessions to the store takes well under a second


def documents(*names: str) -> list[dict]:
    return [doc for name in names for doc in yaml.safe_load_all((DEPLOY / name).read_text())]


def manifests() -> dict[tuple[str, str], dict]:
    docs = documents("tcnserve.yaml", "proxy.yaml", "redis.yaml")
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


WORKLOADS = ("Deployment", "StatefulSet")


def workload(m: dict, name: str) -> dict:
    (found,) = [d for (kind, n), d in m.items() if kind in WORKLOADS and n == name]
    return found


def pod_specs() -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in manifests().values() if d["kind"] in WORKLOADS]


# The oldest Kubernetes these manifests support, a recent one, and the newest schema known.
KUBERNETES_VERSIONS = ("1.25.0", "1.32.0", "1.37.0")


def test_every_manifest_is_valid_against_the_kubernetes_api_strictly():
    """No field Kubernetes does not know (strict: a misspelt key is an error, not ignored)."""
    import kubernetes_validate

    docs = documents("tcnserve.yaml", "proxy.yaml", "redis.yaml")
    assert len(docs) >= 8
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_one_worker_per_pod_with_probes_that_mean_something():
    m = manifests()
    pod = m[("StatefulSet", "tcnserve")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["serve"]
    assert not any("--workers" in a or "WEB_CONCURRENCY" in a for a in container["args"])
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"  # /healthz is always 200
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert set(env_of(container)) - {"TCNSERVE_API_KEYS_FILE"} <= {
        "TCNSERVE_" + f.upper() for f in (*FLAGS, "device")
    }


def test_the_grace_period_covers_the_drain():
    pod = manifests()[("StatefulSet", "tcnserve")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env_of(container)["TCNSERVE_DRAIN_S"])
    needed = float(pre_stop[1]) + drain + UVICORN_GRACEFUL_S + DUMP_BUDGET_S
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_sessions_go_to_the_store_and_the_proxy_hashes_the_session_id():
    m = manifests()
    (container,) = m[("StatefulSet", "tcnserve")]["spec"]["template"]["spec"]["containers"]
    store = env_of(container)["TCNSERVE_SESSION_STORE"]
    redis_service = m[("Service", "tcnserve-redis")]
    assert store == f"redis://{redis_service['metadata']['name']}:6379/0"
    assert m[("Service", "tcnserve")]["spec"]["clusterIP"] == "None"  # DNS lists the pods
    conf = (DEPLOY / "haproxy.cfg").read_text()
    assert "balance hash req.hdr(X-Session-ID)" in conf and "hash-type consistent" in conf
    # One server per pod name, in ordinal order, as many as the StatefulSet may grow to: the
    # ring every proxy builds is the same, whichever pods it resolved first.
    pods = m[("StatefulSet", "tcnserve")]
    assert pods["spec"]["serviceName"] == m[("Service", "tcnserve")]["metadata"]["name"]
    servers = re.findall(r"^\s*server (\S+) (\S+)", conf, re.MULTILINE)
    assert servers == [
        (f"tcnserve-{n}", f'"tcnserve-{n}.${{TCNSERVE_PODS}}:${{TCNSERVE_POD_PORT}}"')
        for n in range(len(servers))
    ]
    assert "server-template" not in conf
    assert pods["spec"]["replicas"] <= len(servers) == 16
    assert "http-check send meth GET uri /readyz" in conf
    (proxy,) = m[("Deployment", "tcnserve-proxy")]["spec"]["template"]["spec"]["containers"]
    assert proxy["command"][-1].endswith("haproxy-start.sh")
    assert proxy["args"][-1].endswith("haproxy.cfg")
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = kustomization["configMapGenerator"][0]["files"]
    assert files == ["haproxy.cfg", "haproxy-start.sh"]
    # Nothing names the namespace or the cluster domain: the start script finds both.
    for name in ("haproxy.cfg", "tcnserve.yaml", "proxy.yaml", "redis.yaml"):
        assert "svc.cluster.local" not in (DEPLOY / name).read_text()


def test_every_image_is_set_in_one_place():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    pinned = {i["name"] for i in kustomization["images"]}
    used = []
    gpu_patch = documents("gpu/tcnserve-gpu.yaml")
    workloads = [d for d in manifests().values() if d["kind"] in WORKLOADS]
    for doc in [*workloads, *gpu_patch]:
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if "image" in container:
                used.append(container["image"])
    assert used and all(":" not in image and "/" not in image for image in used), used
    assert set(used) <= pinned
    holders = [p.name for p in DEPLOY.rglob("*.yaml") if "newName:" in p.read_text()]
    assert holders == ["kustomization.yaml"]  # the registry is named once per image
    assert "newName" not in (DEPLOY / "gpu" / "kustomization.yaml").read_text()


def test_pods_meet_the_restricted_pod_security_standard():
    for pod in pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True


def test_every_pod_has_limits_a_high_uid_and_a_network_policy():
    m = manifests()
    policies = [d for d in m.values() if d["kind"] == "NetworkPolicy"]
    for doc in [d for d in m.values() if d["kind"] in WORKLOADS]:
        pod = doc["spec"]["template"]
        assert pod["spec"]["securityContext"]["runAsUser"] >= 10000
        for container in pod["spec"]["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        labels = pod["metadata"]["labels"]
        (policy,) = [
            p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
        assert len(ports) == 1, policy  # one port open per pod, nothing else
    # The pods' port only from the proxy (and the scraper): /metrics there needs no key.
    (rule,) = m[("NetworkPolicy", "tcnserve")]["spec"]["ingress"]
    proxy_labels = workload(m, "tcnserve-proxy")["spec"]["template"]["metadata"]["labels"]
    assert {"podSelector": {"matchLabels": proxy_labels}} in rule["from"]


def test_disruption_budgets_and_spread():
    m = manifests()
    for name in ("tcnserve", "tcnserve-proxy"):
        deployment = workload(m, name)
        budget = m[("PodDisruptionBudget", name)]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["maxUnavailable"] == 1 < deployment["spec"]["replicas"]
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    # A StatefulSet replaces one pod at a time (drained first), under the same name.
    pods = m[("StatefulSet", "tcnserve")]["spec"]
    assert pods["updateStrategy"] == {"type": "RollingUpdate"}
    assert pods["podManagementPolicy"] == "Parallel"


def test_the_gpu_variant_asks_for_a_gpu_and_runs_on_cuda():
    component = yaml.safe_load((DEPLOY / "gpu" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    kustomization = (DEPLOY / "kustomization.yaml").read_text()
    assert re.search(r"^# components:\n#   - gpu$", kustomization, re.M)
    (patch,) = documents("gpu/tcnserve-gpu.yaml")
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["TCNSERVE_DEVICE"] == "cuda"
    assert container["image"] == "tcnserve-cuda"


def test_tagged_images_are_pulled_at_every_start():
    """The images are tags, which move: each start asks the registry what the tag names now."""
    for pod in pod_specs():
        for container in pod["containers"]:
            assert container["imagePullPolicy"] == "Always", container["name"]


def static_checks_section() -> str:
    readme = (DEPLOY / "README.md").read_text()
    return readme.split("\n## Static checks\n", 1)[1].split("\n## ", 1)[0]


def test_every_checkov_skip_gives_its_reason_here_and_in_the_readme():
    skipped = set()
    for doc in manifests().values():
        for key, value in doc["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                # checkov splits the value on "=": one check id, then a reason with no "=".
                assert re.fullmatch(r"CKV2?_K8S_\d+=[^=]{20,}", value), value
                skipped.add(value.split("=")[0])
    listed = re.findall(r"^\| `(CKV2?_K8S_\d+)`", static_checks_section(), re.M)
    assert skipped and sorted(skipped) == sorted(listed)


def test_ci_runs_checkov_offline_over_the_rendered_manifests():
    script = (ROOT / "scripts" / "checkov.sh").read_text()
    assert "bash scripts/checkov.sh" in (ROOT / ".ci" / "run").read_text()
    assert "--skip-download" in script and "kubectl kustomize" in script
    version = re.search(r"^CHECKOV_VERSION=(\S+)$", script, re.M).group(1)
    assert f"checkov {version}" in static_checks_section()  # the counts there are its


def test_dockerfile_installs_cpu_torch_from_pytorchs_index():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    pin = re.search(r"torch==([\d.]+)", ci).group(1)
    assert f"ARG TORCH_VERSION={pin}" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert re.search(r"^USER (?!root)", dockerfile, re.M)
    instructions = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert not any("--workers" in line for line in instructions)
    assert (ROOT / ".dockerignore").is_file()


def test_the_image_install_carries_the_default_model(tmp_path):
    """The Dockerfile installs the project as a wheel (`pip install .`): it must hold the
    built-in model, which the image serves by default."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("tcnserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "service/default_model/model.safetensors" in names
    assert "service/default_model/config.json" in names
    assert "service/store/redis_store.py" in names
