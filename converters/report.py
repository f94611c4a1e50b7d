"""The converter's report: ``report.json`` (machine-readable) and ``report.html`` (for people).

The HTML is self-contained (inline SVG plots, no scripts, no network): per-layer error, latency
and size of each artifact, what stayed float and why, pruning before/after, and any output
that could not be produced with the reason.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["bar_chart_svg", "render_html", "write_report"]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def bar_chart_svg(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    unit: str = "",
    highlight_below: float | None = None,
    width: int = 720,
) -> str:
    """A horizontal bar chart as inline SVG; bars under ``highlight_below`` are drawn red."""
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=1.0) or 1.0
    row, label_w, pad = 18, 220, 8
    height = pad * 2 + 22 + row * len(labels)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pad}" y="{pad + 12}" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    span = width - label_w - pad * 2 - 70
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = pad + 22 + i * row
        shown = value if math.isfinite(value) else top
        w = max(1.0, span * max(0.0, shown) / top)
        bad = highlight_below is not None and value < highlight_below
        color = "#c0392b" if bad else "#2e86c1"
        short = label if len(label) <= 34 else label[:15] + "..." + label[-16:]
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 12}" font-size="11" text-anchor="end">'
            f"{html.escape(short)}</text>"
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{color}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 12}" font-size="11">{_fmt(value)}{unit}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any]) -> str:
    """The readable report page for a report dict (the same data as report.json)."""
    model = report.get("model", {})
    title = f"edgert convert: {model.get('name', 'model')}"
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
        ".warn{color:#a04000}.bad{color:#c0392b;font-weight:bold}.ok{color:#1e8449}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>source {html.escape(_fmt(model.get('source')))}; task {html.escape(_fmt(model.get('task')))};"
        f" input {html.escape(_fmt(model.get('input')))}</p>",
    ]
    status = report.get("status", {})
    if status:
        cls = "ok" if status.get("ok") else "bad"
        out.append(f"<p class='{cls}'>{html.escape(_fmt(status.get('message')))}</p>")
    target = report.get("target", {})
    if target:
        out.append(
            f"<h2>Target</h2><p>{html.escape(_fmt(target.get('name')))}: "
            f"{html.escape(_fmt(target.get('options')))}</p>"
        )
        for warning in target.get("preflight", []):
            out.append(f"<p class='warn'>preflight: {html.escape(str(warning))}</p>")
    calib = report.get("calibration", {})
    if calib:
        out.append(f"<h2>Calibration</h2><p>{html.escape(_fmt(calib))}</p>")
    artifacts = report.get("artifacts", [])
    out.append("<h2>Artifacts</h2>")
    out.append(
        _table(
            artifacts,
            [
                "format",
                "precision",
                "file",
                "size_bytes",
                "latency_ms_p50",
                "threads",
                "metric",
                "agreement",
                "speedup_vs_fp32",
                "size_ratio_vs_fp32",
            ],
        )
    )
    for art in artifacts:
        if art.get("speedup_vs_fp32") is not None and art["speedup_vs_fp32"] < 1.0:
            out.append(
                f"<p class='bad'>{html.escape(art['format'])} {html.escape(art['precision'])} "
                f"is SLOWER than fp32 on this host ({art['speedup_vs_fp32']:.2f}x)</p>"
            )
    timed = [a for a in artifacts if a.get("latency_ms_p50") is not None]
    if timed:
        names = [f"{a['format']} {a['precision']}" for a in timed]
        out.append(
            bar_chart_svg(
                names, [float(a["latency_ms_p50"]) for a in timed], title="latency p50 (host)", unit=" ms"
            )
        )
        out.append(
            bar_chart_svg(names, [float(a["size_bytes"]) / 1024 for a in timed], title="size", unit=" KiB")
        )
    skipped = report.get("skipped", [])
    if skipped:
        out.append("<h2>Not produced</h2>" + _table(skipped, ["format", "precision", "reason"]))
    fallback = report.get("fallback")
    if fallback:
        out.append("<h2>Accuracy-aware fallback</h2>")
        out.append(
            f"<p>budget {html.escape(_fmt(fallback.get('max_drop')))}: "
            f"{html.escape(_fmt(fallback.get('result')))}</p>"
        )
        for fmt, kept in fallback.get("kept_float", {}).items():
            out.append(f"<h3>{html.escape(fmt)}: kept in float</h3>" + _table(kept, ["name", "reason"]))
    for fmt, layers in report.get("per_layer", {}).items():
        if not layers:
            continue
        out.append(f"<h2>Per-layer error ({html.escape(fmt)})</h2>")
        out.append(
            bar_chart_svg(
                [str(x.get("name")) for x in layers],
                [float(x.get("sqnr_db", float("nan"))) for x in layers],
                title=f"{fmt}: SQNR per layer (higher is better; red < 20 dB)",
                unit=" dB",
                highlight_below=20.0,
            )
        )
    pruning = report.get("pruning")
    if pruning:
        summary = {k: v for k, v in pruning.items() if k != "layers"}
        out.append(f"<h2>Pruning</h2><p>{html.escape(_fmt(summary))}</p>")
        out.append(_table(pruning.get("layers", []), ["name", "before", "after", "note"]))
    notes = report.get("notes", [])
    if notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(report: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``directory`` (atomically)."""
    json_path, html_path = directory / "report.json", directory / "report.html"
    _atomic_write(json_path, json.dumps(report, indent=2, sort_keys=True, default=str))
    _atomic_write(html_path, render_html(report))
    return json_path, html_path
