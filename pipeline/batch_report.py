"""``index.html`` of a batch run: counts, the files not classified with their reasons, and a
gallery of overlays with class, probability and the heatmap's colour scale.

The page is self-contained (inline CSS, no scripts, no network) and links the overlay PNGs by
relative path (``overlays/<pseudo_id>.png``), so the output folder can be moved or zipped as a
whole. It shows pseudonymous ids, never a header value; the ``rel_path`` of files that were
not classified is the user's own path (as in ``errors.csv``).
"""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_index_html"]

GALLERY_MAX = 500  # overlays shown (the most confident first); the CSV has every row

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;
text-align:left;font-size:.9em}figure{display:inline-block;margin:.4em;width:220px;
vertical-align:top}figure img{width:220px;height:auto;background:#000}figcaption{font-size:.8em}
.legend{display:flex;align-items:center;gap:.5em;font-size:.85em}
.bar{width:240px;height:14px;background:linear-gradient(to right,#2040ff,#808080,#ff2020)}
.flag{color:#a60}.ok{color:#070}
"""


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8", errors="backslashreplace") as fh:
        return list(csv.DictReader(fh))


def _counts_table(summary: Any) -> str:
    e = html.escape
    items = [
        ("files found", summary.files_found),
        ("classified", summary.predictions),
        *[(f"predicted {c}", n) for c, n in summary.per_class.items()],
        *[(f"not classified: {k}", n) for k, n in summary.errors_by_kind.items()],
        ("lung mask flagged (classified)", summary.seg_flagged),
    ]
    body = "".join(f"<tr><th>{e(str(k))}</th><td>{int(v)}</td></tr>" for k, v in items)
    return f"<table>{body}</table>"


def _errors_table(rows: Sequence[dict[str, str]]) -> str:
    e = html.escape
    order = {"refused": 0, "flagged": 1, "unreadable": 2, "failed": 3, "duplicate": 4}
    rows = sorted(rows, key=lambda r: (order.get(r["kind"], 9), r["rel_path"]))
    body = "".join(
        f"<tr><td>{e(r['kind'])}</td><td>{e(r['rel_path'])}</td><td>{e(r['error'])}</td>"
        f"<td>{e(r['reason'])}</td></tr>"
        for r in rows
    )
    head = "<tr><th>kind</th><th>file</th><th>error</th><th>reason</th></tr>"
    return f"<table>{head}{body}</table>" if rows else "<p>none</p>"


def _gallery(out: Path, rows: Sequence[dict[str, str]], classes: Sequence[str]) -> str:
    e = html.escape

    def top(r: dict[str, str]) -> float:
        value = r.get(f"prob_{r['pred']}", "")
        return float(value) if value else 0.0

    figures = []
    for r in sorted(rows, key=top, reverse=True)[:GALLERY_MAX]:
        png = Path("overlays") / f"{r['pseudo_id']}.png"
        img = (
            f'<img src="{e(png.as_posix())}" alt="overlay {e(r["pseudo_id"])}" loading="lazy">'
            if (out / png).is_file()
            else "<p>(no overlay: run with heatmaps)</p>"
        )
        probs = ", ".join(f"{e(c)} {e(r.get(f'prob_{c}', ''))}" for c in classes)
        seg = (
            '<span class="ok">mask ok</span>'
            if r["seg_ok"] == "True"
            else f'<span class="flag">mask flagged: {e(r["seg_flags"])}</span>'
        )
        figures.append(
            f"<figure>{img}<figcaption><b>{e(r['pred'])}</b> p={top(r):.3f}<br>{probs}<br>"
            f"{seg}<br>{e(r['pseudo_id'])}</figcaption></figure>"
        )
    return "".join(figures) or "<p>no image was classified</p>"


def write_index_html(out: Path, summary: Any, classes: Sequence[str]) -> Path:
    """Write ``out/index.html`` from ``predictions.csv``, ``errors.csv`` and the run's
    :class:`~pipeline.batch.BatchSummary` (atomically: tmp + rename)."""
    preds, errs = _rows(out / "predictions.csv"), _rows(out / "errors.csv")
    legend = (
        '<div class="legend">heatmap (LRP-epsilon of the predicted class): '
        '<span>against</span><span class="bar"></span><span>for</span>; '
        "yellow outline: predicted lungs</div>"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary.notes)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>isnet-cxr batch run</title>"
        f"<style>{_CSS}</style></head><body><h1>Batch run</h1>{_counts_table(summary)}"
        + (f"<ul>{notes}</ul>" if notes else "")
        + "<h2>Not classified</h2>"
        + _errors_table(errs)
        + f"<h2>Classified ({len(preds)})</h2>{legend}"
        + _gallery(out, preds, classes)
        + "</body></html>\n"
    )
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / "index.html")
    return out / "index.html"
