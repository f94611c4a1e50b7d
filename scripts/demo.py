"""``make demo``: run the daemon offline on the shipped demo bundles and show what it saw.

Runs the real ``edgert run`` command twice - the shapes camera classifier on a demo video and
the vibration anomaly model on a demo sensor file - with signature checks on, then prints a
readable timeline from the JSONL results and each run's summary. No network, no broker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"


def _run(bundle: Path, source: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    keys = sorted((DEMO / "keys").glob("*.pub"))
    cmd = [
        sys.executable,
        "-m",
        "edge_runtime",
        "--log-level",
        "warning",
        "run",
        "--bundle",
        str(bundle),
        "--source",
        str(source),
        "--sink",
        f"jsonl:{out}",
        *extra,
    ]
    for key in keys:
        cmd += ["--trust-key", str(key)]
    shown = " ".join(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c for c in cmd[1:])
    print(f"$ edgert {shown.split(' ', 2)[2]}")
    out.unlink(missing_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"demo run failed with exit code {proc.returncode}")
    for line in proc.stderr.splitlines():
        if line.startswith('{"summary"'):
            return dict(json.loads(line)["summary"])
    raise SystemExit("the daemon printed no summary")


def _segments(rows: list[dict[str, Any]], key: str) -> list[tuple[int, int, str, float]]:
    """Runs of consecutive results with the same label: (first, last, label, mean score)."""
    segs: list[tuple[int, int, str, list[float]]] = []
    for row in rows:
        label, score = _label(row, key)
        if segs and segs[-1][2] == label:
            segs[-1][3].append(score)
            segs[-1] = (segs[-1][0], row["frame"], label, segs[-1][3])
        else:
            segs.append((row["frame"], row["frame"], label, [score]))
    return [(a, b, label, sum(s) / len(s)) for a, b, label, s in segs]


def _label(row: dict[str, Any], key: str) -> tuple[str, float]:
    if key == "top":
        best = row["top"][0]
        return str(best["label"]), float(best["score"])
    return ("ANOMALY" if row.get("anomaly") else "normal"), float(row.get("score", 0.0))


def _show(title: str, out: Path, summary: dict[str, Any], key: str) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    print(
        f"\n== {title}: {len(rows)} results in {out.relative_to(REPO) if out.is_relative_to(REPO) else out}"
    )
    unit = "frames" if key == "top" else "windows"
    for a, b, label, score in _segments(rows, key):
        what = "mean top-1 score" if key == "top" else "mean anomaly score"
        print(f"  {unit} {a:>4}-{b:<4} {label:<10} ({what} {score:.3g})")
    lat = summary["latency_ms"]
    print(
        f"  model {summary['model']} ({summary['format']}): {summary['frames']} results, "
        f"{summary['fps']:.0f} fps, dropped {summary['dropped']}, errors {summary['errors'] or 0}"
    )
    print(
        f"  latency ms p50/p95: inference {lat['inference'].get('p50')}/{lat['inference'].get('p95')}, "
        f"end-to-end {lat['total'].get('p50')}/{lat['total'].get('p95')}; "
        f"first result after {summary['first_result_s']} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    shapes = _run(DEMO / "shapes", DEMO / "shapes.avi", out / "shapes.jsonl", [])
    _show("camera: shapes classifier on a demo video", out / "shapes.jsonl", shapes, "top")
    vib = _run(DEMO / "vibration", DEMO / "vibration.csv", out / "vibration.jsonl", ["--format", "tflite"])
    _show(
        "sensor: vibration anomaly model on a 3-axis accelerometer file",
        out / "vibration.jsonl",
        vib,
        "anomaly",
    )
    print("\nOffline, signature-checked, self-tested. Results: out/*.jsonl. Next: README 'Run your model'.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
