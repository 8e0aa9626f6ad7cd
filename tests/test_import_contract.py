"""The layers' import contract, read from the source (no import is executed).

model/ is the model layer: it knows no service and no web framework. service/ is layered by
folder, bottom first: protocol (what server and client agree on), the shared settings and
metrics, models, sessions, store, engine, then the edges (http, ws, oip) and the top (app,
commands). Nothing imports upward, nothing below the edges knows a web framework, and the
client needs only the protocol.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ("fastapi", "starlette", "uvicorn", "httptools", "h11", "websockets", "grpc")


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def files(*patterns: str) -> list[Path]:
    out = []
    for pattern in patterns:
        out += sorted(ROOT.glob(pattern))
    assert out, patterns
    return out


def under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("path", files("model/**/*.py"), ids=str)
def test_the_model_layer_knows_no_service_and_no_web(path):
    bad = [n for n in imports(path) if under(n, ("service", *WEB))]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


# service/'s layers, bottom first. A module may import its own layer and those below it, never
# one above: edge -> engine -> store -> sessions -> models -> model/. docs/scaling.md draws it.
LAYERS = (
    ("protocol", ("service.protocol",)),
    (
        "shared",
        (
            "service.settings",
            "service.metrics",
            "service.auth",
            "service.log_redaction",
            "service.gc_tuning",
        ),
    ),
    ("models", ("service.models",)),
    ("sessions", ("service.sessions",)),
    ("store", ("service.store",)),
    ("engine", ("service.engine",)),
    ("edges", ("service.http", "service.ws", "service.oip", "service.grpc")),
    ("top", ("service.app", "service.commands", "service.cli")),
)
CLIENT = ("service.client",)  # beside the layers: it may import service.protocol only
TOP = len(LAYERS) - 1
EDGES = LAYERS.index(("edges", ("service.http", "service.ws", "service.oip", "service.grpc")))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int | None:
    for i, (_, roots) in enumerate(LAYERS):
        if under(name, roots):
            return i
    return None


SERVICE = [p for p in files("service/**/*.py") if not under(module_name(p), CLIENT)]


@pytest.mark.parametrize("path", SERVICE, ids=str)
def test_every_module_has_a_layer_and_imports_nothing_above_it(path):
    me = module_name(path)
    if me == "service":
        return
    mine = layer_of(me)
    assert mine is not None, f"{me} belongs to no layer of tests/test_import_contract.py"
    found = {n for n in imports(path) if under(n, ("service",)) and n != "service"}
    if me == "service.engine.process":  # starts an edge too: the app, inside edge_main only
        found -= {n for n in found if under(n, ("service.app", "service.commands.serve"))}
    above = sorted(
        n for n in found if (layer_of(n) or 0) > mine or (under(n, CLIENT) and mine < TOP)
    )
    assert not above, f"{me} ({LAYERS[mine][0]}) imports {above} from above"


@pytest.mark.parametrize(
    "path", [p for p in SERVICE if (layer_of(module_name(p)) or 0) < EDGES], ids=str
)
def test_below_the_edges_nothing_knows_http(path):
    bad = [n for n in imports(path) if under(n, WEB)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_protocol_layer_imports_only_itself():
    for path in files("service/protocol/*.py"):
        ours = {n for n in imports(path) if under(n, ("service", "model"))}
        assert all(under(n, ("service.protocol",)) for n in ours), (path, ours)


@pytest.mark.parametrize("path", files("service/client/*.py"), ids=str)
def test_the_client_needs_only_the_protocol(path):
    ours = {n for n in imports(path) if under(n, ("service", "model")) and n != "service"}
    assert all(under(n, ("service.protocol", *CLIENT)) for n in ours), (path, ours)


def test_the_engine_messages_need_only_the_error_classes():
    ours = {n for n in imports(ROOT / "service/engine/messages.py") if under(n, ("service",))}
    assert ours <= {"service", "service.protocol", "service.protocol.errors"}, ours


def test_the_error_code_table_needs_nothing():
    assert not {
        n
        for n in imports(ROOT / "service/protocol/error_codes.py")
        if not under(n, ("__future__",))
    }


def modules_after(code: str) -> set[str]:
    """The modules loaded once `code` has run in a fresh interpreter (imports followed
    transitively, whatever the test process has loaded already)."""
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_engine_process_loads_no_web_framework():
    """What an engine process imports, followed transitively: the engine speaks only its own
    messages, so no HTTP module may come along."""
    loaded = modules_after(
        "import service.engine.server, service.engine.process, service.sessions.manager, "
        "service.models.registry, service.store.durability"
    )
    assert not sorted(
        n
        for n in loaded
        if under(n, WEB)
        or under(n, ("service.http", "service.ws", "service.oip", "service.grpc", "service.app"))
    )


def test_an_edge_process_loads_no_torch():
    """An edge never computes: its app, built against an engine, leaves torch unloaded (it
    would cost each edge process hundreds of MiB and a second of startup)."""
    loaded = modules_after(
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "create_app(Settings(), engine_socket='/nonexistent/engine.sock')"
    )
    assert not sorted(n for n in loaded if under(n, ("torch",)))
