"""Service throughput against concurrent sessions, drawn from the service benches' saved results.

    python bench/ws_stream.py --json docs/benchmarks/results/ws_stream.json
    python bench/edge_http.py --json docs/benchmarks/results/edge_http.json
    python bench/open_loop.py --json docs/benchmarks/results/open_loop.json
    python bench/plot_service.py      # -> docs/benchmarks/service_throughput.png

Reads whichever of those files exist (or the paths given): per transport, timesteps/s over all
sessions against the number of sessions: from ws_stream, WebSocket binary (one and, if
measured, ten rows per message), WebSocket JSON, `WS /v1/streams` (many sessions per
message) and, when it ran with --echo, the same stack's WebSocket echo
doing no work (the reference the others are read against); many sessions per request (`POST
/v1/steps`, from edge_http and open_loop; open_loop is paced, so its point is what was asked
for, not a ceiling). No timing happens here: rerun the benches on a quiet machine and redraw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks" / "results"
DEFAULT_INPUTS = [RESULTS / f"{name}.json" for name in ("ws_stream", "edge_http", "open_loop")]

TRANSPORTS = {
    "ws-binary": "WebSocket, binary frames",
    "ws-json": "WebSocket, JSON text frames",
    "ws-multi": "WS /v1/streams, many sessions per message",
}
# label prefix -> (marker and line, color); the first that a label starts with wins. Several
# rows per message are drawn dotted, in their transport's color.
STYLES = [
    ("no-work", ("--", "0.45")),
    ("WebSocket, binary", ("o-", "C0")),
    ("WebSocket, JSON", ("s-", "C2")),
    ("WS /v1/streams", ("X-", "C5")),
    ("HTTP single-row", ("v", "C1")),
    ("many sessions per request", ("D", "C3")),
    ("", ("P", "C4")),
]


def ws_label(case: dict) -> str | None:
    """The series a ws_stream case belongs to (transport, rows per message, stack), or None
    for a case the plot leaves out."""
    rows = case.get("rows", 1)
    if case["transport"] not in TRANSPORTS:
        return None  # HTTP pushes: its Python client is the limit there; edge_http uses wrk
    if case.get("stack", "tcnserve") != "tcnserve":
        if (case["transport"], rows) != ("ws-binary", 1):
            return None  # one floor is enough to read the others against
        return "no-work: the same stack's WebSocket echo, 1 row per message"
    per = "session" if case["transport"] == "ws-multi" else "message"
    return f"{TRANSPORTS[case['transport']]}, {rows} row{'s' if rows > 1 else ''} per {per}"


def series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """label -> [(sessions, steps/s)] from the benches' records."""
    out: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        results = record["results"]
        if record["bench"] == "ws_stream":
            for case in results:
                label = ws_label(case)
                if label is not None:
                    out.setdefault(label, []).append((case["sessions"], case["rate"]))
        elif record["bench"] == "edge_http":
            push, many = results["push"], results["many"]
            out.setdefault("HTTP single-row pushes under wrk (keep-alive connections)", []).append(
                (results["push_sessions"], push["rps"])
            )
            out.setdefault("many sessions per request: POST /v1/steps under wrk", []).append(
                (results["sessions_per_request"], many["rps"] * results["sessions_per_request"])
            )
        elif record["bench"] == "open_loop":
            out.setdefault(
                "POST /v1/steps, paced open loop (offered load, not a ceiling)", []
            ).append((results["sessions"], results["steps_per_s"]))
    return {label: sorted(points) for label, points in out.items()}


def style(label: str) -> tuple[str, str]:
    fmt, color = next(look for prefix, look in STYLES if label.startswith(prefix))
    several = " rows per " in label and not label.startswith("no-work")
    return (fmt.replace("-", ":") if several else fmt), color


def draw(records: list[dict], path: Path, note: str) -> None:
    """Two panels side by side, one row per message (with the echo, which carries one row) and
    several rows per message, so no series is read against a floor of another kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), sharey=True)
    panels = ("one row per message or per session", "several rows per message or per session")
    for label, points in series(records).items():
        marker, color = style(label)
        ax = axes[1 if " rows per " in label and not label.startswith("no-work") else 0]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker, color=color, label=label)
    for ax, title in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions")
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8.5)
    axes[0].set_ylabel("timesteps served per second, all sessions")
    fig.suptitle("Service throughput vs concurrent sessions (built-in model, CPU)")
    where = [f"{r['bench']}: {' | '.join(r['environment'].splitlines())}" for r in records]
    fig.text(0.01, 0.0, "\n".join([*where, note]), fontsize=8.5, va="top", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, help="results files (default: all found)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks" / "service_throughput.png"
    )
    parser.add_argument(
        "--note",
        default="clients and server on the same machine; a shared machine unless stated",
        help="one line for the footer",
    )
    args = parser.parse_args(argv)
    paths = args.inputs or [p for p in DEFAULT_INPUTS if p.exists()]
    if not paths:
        parser.error("no results: run the benches with --json first (see the docstring)")
    records = [json.loads(p.read_text()) for p in paths]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(records, args.out, args.note)
    print(f"plot: {args.out} (from {', '.join(str(p) for p in paths)})")


if __name__ == "__main__":
    main()
