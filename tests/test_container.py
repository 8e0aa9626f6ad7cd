"""The image's lock (constraints.txt) against pyproject.toml, the Dockerfile and CI; no podman.

scripts/container_check.sh builds the image and checks that everything it installed is pinned;
these tests catch a stale lock in a second, before any build.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][A-Za-z0-9.!+]*)", line.strip())
            assert match, f"constraints.txt: {line!r} is not one exact pin NAME==VERSION"
            name = canonicalize_name(match[1])
            assert name not in pins, f"constraints.txt pins {name} twice"
            pins[name] = match[2]
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_the_lock_pins_every_runtime_dependency_within_its_range():
    pins = locked()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it"
        version = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {name}=={version}, outside pyproject.toml's {requirement}"
        )


def test_the_lock_pins_what_the_dependencies_extras_bring():
    """uvicorn[standard]: the extra's packages (on Linux) are pinned too."""
    pins = locked()
    for requirement in runtime_requirements():
        for extra in requirement.extras:
            for dependency in importlib.metadata.requires(requirement.name) or []:
                wanted = Requirement(dependency)
                environment = {"extra": extra, "sys_platform": "linux"}
                if wanted.marker is not None and wanted.marker.evaluate(environment):
                    name = canonicalize_name(wanted.name)
                    assert name in pins, f"{requirement.name}[{extra}] needs {name}: not pinned"


def test_torch_is_pinned_at_one_version_in_the_lock_the_dockerfile_and_ci():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (in_dockerfile,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    in_ci = set(re.findall(r"torch==([0-9][^\s'\"]*)", ci))
    assert locked()["torch"] == in_dockerfile
    assert in_ci == {in_dockerfile}, f".ci/run pins torch {in_ci}, the Dockerfile {in_dockerfile}"


def test_every_pip_install_in_the_image_uses_the_lock():
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^&]*", dockerfile.replace("\\\n", " "))
    assert installs
    for install in installs:
        assert "-c constraints.txt" in install, install
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!constraints.txt" in ignore
