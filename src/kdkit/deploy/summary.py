"""The "Deployment" section of a run's ``report.md``: what ``kdkit export`` checked for each exported file
(parity with PyTorch, the metric, int8) and the latencies ``kdkit profile --runtime`` measured
(kept in ``RUN/export/latency.json``). Rewritten after every export or profile of the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..engine.checkpoint import atomic_write_text
from ..report.runreport import markdown_table

TITLE = "## Deployment"
LATENCY = "latency.json"


def record_latency(run: Path, rows: list[dict[str, Any]]) -> None:
    """Merge profile rows into ``RUN/export/latency.json`` (one entry per runtime and batch) and
    rewrite the report's section."""
    path = run / "export" / LATENCY
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.update({f"{r['runtime']} x{r['batch']}": r for r in rows})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table, indent=2) + "\n")
    update_report(run)


def parity_text(parity: dict[str, Any]) -> str:
    """``max |exported - PyTorch| D on N <source> images (tolerance T)``, per output for several."""
    source = f" {parity['source']}" if "source" in parity else ""
    where = f"on {parity['images']}{source} images"
    outputs = parity.get("outputs")
    if not outputs:
        diff, tolerance = parity["max_abs_diff"], parity["tolerance"]
        return f"max |exported - PyTorch| {diff:.3g} {where} (tolerance {tolerance:.3g})"
    each = ", ".join(
        f"{name} {o['max_abs_diff']:.3g} (tolerance {o['tolerance']:.3g})" for name, o in outputs.items()
    )
    return f"max |exported - PyTorch| {where}: {each}"


def _file_lines(meta: dict[str, Any]) -> list[str]:
    parity = meta.get("parity") or {}
    line = f"- `export/{meta['file']}` ({meta['format']}): {parity_text(parity)}"
    if "metric" in parity:
        line += f"; {parity['metric']} {parity['exported']:.2f} (PyTorch {parity['pytorch']:.2f})"
    lines = [line + "."]
    int8 = meta.get("int8")
    if int8:
        sizes = f"{int8['size_bytes'] / 1e6:.3f} MB (fp32 {int8['fp32_size_bytes'] / 1e6:.3f})"
        text = f"  int8 `export/{int8['file']}`: {sizes}"
        if "int8" in int8:
            text += f", {int8['metric']} {int8['int8']:.2f} (fp32 {int8['fp32']:.2f})"
        lines.append(text + ".")
    return lines


def section(run: Path) -> list[str]:
    """The section's lines (empty when the run has no export)."""
    export = run / "export"
    lines: list[str] = []
    for path in sorted(export.glob("*.json")) if export.is_dir() else []:
        if path.name == LATENCY:
            continue
        meta = json.loads(path.read_text())
        if meta.get("parity"):
            lines += _file_lines(meta)
    latency = export / LATENCY
    if latency.is_file():
        rows = json.loads(latency.read_text()).values()
        lines += [
            "",
            markdown_table(
                ["runtime", "batch", "median (ms)", "p95 (ms)", "file", "size (MB)"],
                [
                    [r["runtime"], str(r["batch"]), f"{r['median_ms']:.2f}", f"{r['p95_ms']:.2f}",
                     Path(r["file"]).name, f"{r['size_bytes'] / 1e6:.3f}"]
                    for r in rows
                ],
            ),
        ]  # fmt: skip
    return [TITLE, "", *lines, ""] if lines else []


def update_report(run: Path) -> None:
    """Replace (or add, before the closing ``Files:`` line) the Deployment section of ``report.md``."""
    report = run / "report.md"
    if not report.is_file():
        return
    text = report.read_text().splitlines()
    if TITLE in text:
        start = text.index(TITLE)
        later = range(start + 1, len(text))
        end = next((i for i in later if text[i].startswith(("## ", "Files: "))), len(text))
    else:
        start = end = next((i for i, line in enumerate(text) if line.startswith("Files: ")), len(text))
    atomic_write_text(report, "\n".join([*text[:start], *section(run), *text[end:]]) + "\n")
