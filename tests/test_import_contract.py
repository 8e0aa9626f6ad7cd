"""The layers' import contract, read from the source (no import is executed).

model/ is the model layer: it knows no service and no web framework. Below the edge (the
routes, middleware and protocols), the session manager, registry, worker, store and the engine
know no HTTP. The engine's messages need only the error classes; the error-code table needs
nothing at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ("fastapi", "starlette", "uvicorn", "httptools", "h11", "websockets")


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


CORE = (
    "service/sessions.py",
    "service/session_state.py",
    "service/session_hooks.py",
    "service/session_record.py",
    "service/session_store.py",
    "service/redis_store.py",
    "service/durability.py",
    "service/registry.py",
    "service/batcher.py",
    "service/inference.py",
    "service/inputs.py",
    "service/limits.py",
    "service/errors.py",
    "service/runtime.py",
    "service/engine/*.py",
)
HTTP_LAYER = (
    "service.routes",
    "service.app",
    "service.http_errors",
    "service.http_protocol",
    "service.ws_protocol",
    "service.middleware",
    "service.deps",
    "service.commands",
)


@pytest.mark.parametrize("path", files(*CORE), ids=str)
def test_below_the_edge_nothing_knows_http(path):
    bad = [n for n in imports(path) if under(n, WEB) or under(n, HTTP_LAYER)]
    if path.name == "process.py":  # starts an edge too: the app, inside edge_main only
        bad = [n for n in bad if not under(n, ("service.app", "service.commands.serve"))]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_engine_messages_need_only_the_error_classes():
    ours = {n for n in imports(ROOT / "service/engine/messages.py") if under(n, ("service",))}
    assert ours <= {"service", "service.errors"}, ours


def test_the_error_code_table_needs_nothing():
    assert not {
        n for n in imports(ROOT / "service/error_codes.py") if not under(n, ("__future__",))
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
        "import service.engine.server, service.engine.process, service.sessions, "
        "service.registry, service.durability"
    )
    assert not sorted(n for n in loaded if under(n, WEB) or under(n, HTTP_LAYER))


def test_an_edge_process_loads_no_torch():
    """An edge never computes: its app, built against an engine, leaves torch unloaded (it
    would cost each edge process hundreds of MiB and a second of startup)."""
    loaded = modules_after(
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "create_app(Settings(), engine_socket='/nonexistent/engine.sock')"
    )
    assert not sorted(n for n in loaded if under(n, ("torch",)))
