"""What the container's own processes see, run inside it by scripts/container_check.sh.

    podman exec -i CONTAINER python - < scripts/container_inside.py

Standard library only. Checks the server (PID 1) runs as uid/gid 10001 with no capabilities and
no_new_privs, the root filesystem is read-only with /tmp a writable tmpfs and the model mount
read-only, and the image holds no build leftovers or source (only the installed packages).
Prints one `ok` line per check and the largest installed packages; exits 1 naming each failure.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

UID = GID = 10001
MODEL_MOUNT = Path("/models/tiny")
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"ok: {what}" if ok else f"FAILED: {what}")
    if not ok:
        failures.append(what)


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def read_only(directory: Path) -> bool:
    probe = directory / ".container-check"
    try:
        probe.write_text("x")
    except OSError as e:
        return e.errno == errno.EROFS
    probe.unlink()
    return False


def mount_of(path: str) -> tuple[str, set[str]]:
    """(filesystem type, mount options) of the mount at exactly `path`."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == path:
            fstype = fields[fields.index("-") + 1]
            return fstype, set(fields[5].split(","))
    return "", set()


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


server = status_of(1)
cmdline = Path("/proc/1/cmdline").read_bytes().split(b"\0")
command = b" ".join(cmdline).decode(errors="replace").strip()
is_server = any(a.endswith(b"/tcnserve") for a in cmdline[:2]) and b"serve" in cmdline
check(is_server, f"PID 1 is the server: {command}")
uids, gids = server["Uid"].split(), server["Gid"].split()
check(set(uids) == {str(UID)}, f"PID 1 runs as uid {UID} (real, effective, saved, fs: {uids})")
check(set(gids) == {str(GID)}, f"PID 1 runs as gid {GID} ({gids})")
caps = {k: server[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
check(all(int(v, 16) == 0 for v in caps.values()), f"PID 1 holds no capabilities ({caps})")
check(server.get("NoNewPrivs") == "1", "PID 1 cannot gain privileges (no_new_privs)")
check(os.getuid() == UID, f"the image's USER is uid {UID} (this exec: {os.getuid()})")

root_type, root_options = mount_of("/")
root_ro = "ro" in root_options and read_only(Path("/app")) and read_only(Path("/usr/local"))
check(root_ro, f"the root filesystem is read-only ({root_type} {','.join(sorted(root_options))})")
tmp_type, tmp_options = mount_of("/tmp")
tmp_rw = tmp_type == "tmpfs" and "rw" in tmp_options and not read_only(Path("/tmp"))
check(tmp_rw, f"/tmp is a writable tmpfs ({tmp_type} {','.join(sorted(tmp_options))})")
check(read_only(MODEL_MOUNT), f"the model mount {MODEL_MOUNT} is read-only")

leftovers = sorted(str(p) for p in Path("/app").iterdir())
check(not leftovers, f"/app holds nothing: no source, build/ or egg-info ({leftovers})")
site = Path(sysconfig.get_paths()["purelib"])
roots = {Path("/app"), Path("/home"), Path("/usr/local"), site}
eggs = sorted(str(p) for r in roots if r.exists() for p in r.rglob("tcnserve*.egg-info"))
check(not eggs, f"no tcnserve egg-info anywhere ({eggs})")
for package in ("model", "service"):
    spec = importlib.util.find_spec(package)
    origin = spec.origin if spec else None
    check(origin is not None and origin.startswith(str(site)), f"{package} from {origin}")

sizes = sorted(((tree_size(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)
print(f"site-packages ({site}): {tree_size(site) / 1e6:.0f} MB; largest:")
for size, name in sizes[:8]:
    print(f"  {size / 1e6:7.1f} MB  {name}")
sys.exit(1 if failures else 0)
