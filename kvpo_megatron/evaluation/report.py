"""The evaluation's outputs: per-segment table (CSV + JSON), summary table, and a self-contained HTML report.

``results.csv``: one row per (variant, setting, prompt, segment) with every reward component and the weighted
total. ``summary.csv``: per (variant, setting) the mean over segments. ``results.json``: both, with the run's
metadata. ``report.html``: the summary table (``data-value`` attributes hold the exact numbers of
``summary.csv``), one inline-SVG bar chart per component (and the total) across variants, and per setting a
side-by-side video grid per prompt; videos and posters are referenced relative to the report, so the output
directory can be moved or served as it is.
"""
from __future__ import annotations

import csv
import datetime
import html
import json
from pathlib import Path

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
ROW_KEYS = ("variant", "setting", "prompt_index", "segment", "prompt", "latent_start", "latent_end", "frame_start",
            "frame_end", "video")


def collect(out: Path, variants, jobs) -> tuple[list[dict], list[str]]:
    """Rows (one per video segment, in variant, setting, prompt order) and the component names."""
    rows, comps = [], []
    for v in variants:
        for j in jobs:
            rec = json.loads((out / "scores" / j.setting / f"{j.stem(v)}.json").read_text())
            for seg in rec["segments"]:
                for k in seg["components"]:
                    if k not in comps:
                        comps.append(k)
                rows.append({"variant": v.label, "setting": j.setting, "prompt_index": j.index,
                             "segment": seg["segment"], "prompt": seg["prompt"], "latent_start": seg["latent_start"],
                             "latent_end": seg["latent_end"], "frame_start": seg["frame_start"],
                             "frame_end": seg["frame_end"], "video": rec["video"], "poster": rec["poster"],
                             **seg["components"], "total": seg["total"]})
    return rows, comps


def summarize(rows: list[dict], comps: list[str]) -> list[dict]:
    """Mean of every component and the total over the segments of each (variant, setting)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["setting"]), []).append(r)
    out = [{"variant": v, "setting": s, "segments": len(rs),
            **{k: sum(r[k] for r in rs) / len(rs) for k in (*comps, "total")}} for (v, s), rs in groups.items()]
    base = {r["setting"]: r["total"] for r in out if r["variant"] == "base"}
    for r in out:  # paired: every variant generated the same prompts from the same noise
        r["total_vs_base"] = r["total"] - base[r["setting"]] if r["setting"] in base else float("nan")
    return out


def write_tables(out: Path, rows: list[dict], summary: list[dict], comps: list[str], meta: dict) -> list[Path]:
    cols = [*ROW_KEYS, *comps, "total"]
    paths = [out / "results.csv", out / "summary.csv", out / "results.json"]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "setting", "segments", *comps, "total", "total_vs_base"])
        w.writeheader()
        w.writerows(summary)
    paths[2].write_text(json.dumps({"meta": meta, "components": comps, "summary": summary, "rows": rows}, indent=1))
    return paths


# ------------------------------------------------------------------------------------------------ HTML pieces
def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _axis(vals: list[float]) -> tuple[float, float, float]:
    """(lo, hi, base) of a bar axis: bars start at 0 when 0 is in or near the data's range, else the axis is
    zoomed to the data (differences between checkpoints are often small next to the values) and bars start at
    its bottom; the axis labels say which."""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    if lo > 0 and span > 0.5 * hi or hi < 0 and span > 0.5 * -lo or lo <= 0 <= hi or span == 0 and lo == 0:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        span = max(hi - lo, 1e-12)
        return lo - (0.1 * span if lo < 0 else 0.0), hi + (0.1 * span if hi > 0 else 0.0), 0.0
    pad = 0.25 * span if span > 0 else 0.05 * abs(lo)
    return lo - pad, hi + pad, lo - pad


def bar_chart(title: str, groups: list[str], series: list[str], values: dict[tuple[str, str], float]) -> str:
    """Inline SVG: one group of bars per setting, one bar per variant (colour = variant), value labels."""
    bw, gap, left, top, plot_h = 34, 30, 64, 34, 170
    width = max(260, left + len(groups) * (len(series) * bw + gap) + 10)
    height = top + plot_h + 40
    lo, hi, base = _axis(list(values.values()) or [0.0])

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * plot_h

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" data-component="{_e(title)}">',
             f'<text x="{left}" y="16" class="ct">{_e(title)}</text>',
             f'<line x1="{left}" x2="{width - 6}" y1="{y(base):.1f}" y2="{y(base):.1f}" class="zero"/>']
    for t in sorted({lo, hi, base}):
        parts.append(f'<text x="{left - 4}" y="{y(t) + 4:.1f}" class="ax">{_num(t)}</text>')
    if base != 0.0:
        parts.append(f'<text x="{left}" y="28" class="ax" style="text-anchor:start">axis from {_num(base)}</text>')
    for gi, g in enumerate(groups):
        x0 = left + gi * (len(series) * bw + gap) + gap / 2
        for si, s in enumerate(series):
            if (s, g) not in values:
                continue
            v = values[(s, g)]
            x, y0, y1 = x0 + si * bw, y(max(v, base)), y(min(v, base))
            parts.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bw - 4}" height="{max(y1 - y0, 0.5):.1f}" '
                         f'fill="{PALETTE[si % len(PALETTE)]}" data-variant="{_e(s)}" data-setting="{_e(g)}" '
                         f'data-value="{v!r}"><title>{_e(s)} / {_e(g)}: {v:.6g}</title></rect>')
            ty = y0 - 3 if v >= base else y1 + 10
            parts.append(f'<text x="{x + (bw - 4) / 2:.1f}" y="{ty:.1f}" class="bl">{_num(v)}</text>')
        parts.append(f'<text x="{x0 + len(series) * bw / 2:.1f}" y="{top + plot_h + 18}" class="gl">{_e(g)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(series: list[str]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{_e(s)}</span>' for i, s in enumerate(series)
    ) + "</div>"


def _summary_table(summary: list[dict], comps: list[str]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in ("variant", "setting", "segments", *comps, "total", "total - base"))
    body = []
    for r in summary:
        cells = [f'<td>{_e(r["variant"])}</td>', f'<td>{_e(r["setting"])}</td>',
                 f'<td data-key="segments" data-value="{r["segments"]}">{r["segments"]}</td>']
        cells += [f'<td data-key="{_e(k)}" data-value="{r[k]!r}">{_num(r[k])}</td>'
                  for k in (*comps, "total", "total_vs_base")]
        body.append(f'<tr data-variant="{_e(r["variant"])}" data-setting="{_e(r["setting"])}">' + "".join(cells)
                    + "</tr>")
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _segments_table(rows: list[dict], comps: list[str]) -> str:
    keys = ("variant", "setting", "prompt_index", "segment", "frame_start", "frame_end")
    head = "".join(f"<th>{_e(c)}</th>" for c in (*keys, *comps, "total"))
    body = []
    for r in rows:
        cells = "".join(f"<td>{_e(r[k])}</td>" for k in keys)
        cells += "".join(f'<td data-key="{_e(k)}" data-value="{r[k]!r}">{_num(r[k])}</td>' for k in (*comps, "total"))
        body.append(f'<tr data-variant="{_e(r["variant"])}" data-setting="{_e(r["setting"])}" '
                    f'data-prompt="{r["prompt_index"]}" data-segment="{r["segment"]}">{cells}</tr>')
    return f'<table id="segments"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _video_grid(setting: str, jobs, variants, rows: list[dict]) -> str:
    by_video: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["setting"] == setting:
            by_video.setdefault((r["variant"], r["prompt_index"]), []).append(r)
    out = []
    for j in (j for j in jobs if j.setting == setting):
        starts = [0, *j.switch_frames]
        if len(j.prompts) == 1:
            caption = f"<q>{_e(j.prompts[0])}</q>"
        else:
            caption = "<ol class='sw'>" + "".join(f"<li>from latent frame {s}: <q>{_e(p)}</q></li>"
                                                  for s, p in zip(starts, j.prompts)) + "</ol>"
        cells = []
        for v in variants:
            segs = by_video[(v.label, j.index)]
            total = sum(s["total"] for s in segs) / len(segs)
            per_seg = "" if len(segs) == 1 else "<br><small>segments: " + " / ".join(
                _num(s["total"]) for s in segs) + "</small>"
            cells.append(f'<figure><video src="{_e(segs[0]["video"])}" poster="{_e(segs[0]["poster"])}" autoplay loop '
                         f'muted playsinline controls></video><figcaption><b>{_e(v.label)}</b><br>total '
                         f'{_num(total)}{per_seg}</figcaption></figure>')
        out.append(f'<section class="prompt" data-setting="{_e(setting)}" data-prompt="{j.index}"><h3>prompt '
                   f'{j.index}</h3>{caption}<div class="grid">{"".join(cells)}</div></section>')
    return "".join(out)


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #ddd;background:#fff}
.chart .ct{font:bold 13px sans-serif}.chart .ax{font:10px sans-serif;text-anchor:end;fill:#555}
.chart .gl{font:12px sans-serif;text-anchor:middle}.chart .bl{font:8px sans-serif;text-anchor:middle;fill:#333}
.chart .zero{stroke:#333;stroke-width:1}
.legend span{margin-right:14px;font-size:13px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;
vertical-align:-1px}.grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;text-align:center;font-size:12px}
video{width:176px;height:176px;image-rendering:pixelated;background:#000;object-fit:contain}
section.prompt{border-top:1px solid #eee;padding:6px 0}h3{margin:6px 0;font-size:14px}ol.sw{margin:2px 0;font-size:13px}
.meta{font-size:13px;color:#444}"""


def write_html(out: Path, *, rows: list[dict], summary: list[dict], comps: list[str], variants, jobs,
               meta: dict) -> Path:
    series = [v.label for v in variants]
    settings = list(dict.fromkeys(j.setting for j in jobs))
    charts = "".join(bar_chart(k, settings, series, {(r["variant"], r["setting"]): r[k] for r in summary})
                     for k in (*comps, "total"))
    weights = ", ".join(f"{_e(k)} &times; {w:g}" for k, w in meta.get("weights", {}).items())
    settings_html = "".join(f"<h2>Videos: {_e(s)}</h2>" + _video_grid(s, jobs, variants, rows) for s in settings)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>KVPO evaluation</title><style>{CSS}</style></head>
<body><h1>KVPO evaluation</h1>
<p class="meta">model <b>{_e(meta.get("model", ""))}</b> &middot; {len(variants)} variants &middot;
{len(jobs)} prompts &middot; reward = {weights} &middot; seed {_e(meta.get("seed", ""))} &middot; written
{_e(meta.get("time", ""))}<br>tables: <a href="summary.csv">summary.csv</a> &middot;
<a href="results.csv">results.csv</a> (per segment) &middot; <a href="results.json">results.json</a></p>
<h2>Summary (mean over prompt segments)</h2>{_summary_table(summary, comps)}
<h2>Reward components across checkpoints</h2>{_legend(series)}<div class="charts">{charts}</div>
{settings_html}
<details><summary>Every segment</summary>{_segments_table(rows, comps)}</details>
</body></html>
"""
    path = out / "report.html"
    path.write_text(doc)
    return path


def write_report(out: Path, variants, jobs, meta: dict) -> dict[str, Path]:
    """Collect the finished jobs' scores and write the tables and the HTML report."""
    rows, comps = collect(out, variants, jobs)
    summary = summarize(rows, comps)
    meta = {**meta, "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "variants": [{"label": v.label, "kind": v.kind, "path": v.path, "weights": v.weights} for v in variants]}
    csv_path, summary_path, json_path = write_tables(out, rows, summary, comps, meta)
    html_path = write_html(out, rows=rows, summary=summary, comps=comps, variants=variants, jobs=jobs, meta=meta)
    return {"csv": csv_path, "summary": summary_path, "json": json_path, "html": html_path}
