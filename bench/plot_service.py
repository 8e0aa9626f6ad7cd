"""Service throughput against concurrent sessions, drawn from the service benches' saved results.

    python bench/ws_stream.py --json docs/benchmarks/results/ws_stream.json
    python bench/edge_http.py --json docs/benchmarks/results/edge_http.json
    python bench/open_loop.py --json docs/benchmarks/results/open_loop.json
    python bench/plot_service.py      # -> docs/benchmarks/service_throughput.png

Reads whichever of those files exist (or the paths given): per transport, timesteps/s over all
sessions against the number of sessions, one row per message (WebSocket binary, WebSocket
JSON, HTTP per-session pushes, from ws_stream), and many sessions per request (`POST
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
    "ws-binary": "WebSocket, binary frames (one row each)",
    "ws-json": "WebSocket, JSON text frames (one row each)",
    "http": "HTTP POST /v1/sessions/{id}/steps (one row each)",
}


def series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """label -> [(sessions, steps/s)] from the benches' records."""
    out: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        results = record["results"]
        if record["bench"] == "ws_stream":
            for case in results:
                label = TRANSPORTS.get(case["transport"], case["transport"])
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
    for name, color in (("binary", "C0"), ("JSON", "C2"), ("{id}", "C1")):
        if name in label:
            return ("o-" if name == "binary" else "s-" if name == "JSON" else "^-"), color
    if "wrk" in label and "many" in label:
        return "D", "C3"
    if "wrk" in label:
        return "v", "C1"
    return "P", "C4"


def draw(records: list[dict], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for label, points in series(records).items():
        marker, color = style(label)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker, color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("timesteps served per second, all sessions")
    ax.set_title("Service throughput vs concurrent sessions (built-in model, 1 process, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=7.5)
    where = []
    for record in records:
        lines = record["environment"].splitlines()
        where.append(f"{record['bench']}: {' | '.join(lines)}")
    fig.text(0.01, 0.01, "\n".join([*where, note]), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.04 + 0.018 * len(where), 1, 1))
    fig.savefig(path, dpi=120)
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
