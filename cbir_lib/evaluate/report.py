"""The HTML gallery: a self-contained page (inline CSS, images as data URIs, SVG plots, no
scripts) that an analyst can open anywhere or attach to a ticket.

For sampled queries it shows the query and its top-k thumbnails with scores, framed green
or red when the ground truth says relevant or not; then the precision@i curve, the score
histograms of relevant and irrelevant neighbours, the metrics, and the run's lineage and
recall figures.
"""

from __future__ import annotations

import base64
import html
import io
import json

THUMB = 112


def thumbnail_uri(data: bytes | None, side: int = THUMB) -> str | None:
    """A JPEG data URI of the image scaled to fit ``side`` pixels, or None if undecodable."""
    if not data:
        return None
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (side * 2, side * 2))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken file gets a placeholder, not a crash
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table.kv td{padding:2px 10px;border-bottom:1px solid #eee;font-size:13px;vertical-align:top}
.q{display:flex;gap:6px;align-items:flex-start;margin:10px 0;padding:8px;background:#fff;border:1px solid #ddd;overflow-x:auto}
.cell{width:120px;flex:none;text-align:center;font-size:11px;word-break:break-all}
.cell img{width:112px;height:112px;object-fit:contain;background:#eee;border:4px solid #bbb;box-sizing:content-box}
.cell.query img{border-color:#3366cc}.cell.hit img{border-color:#2a9d3a}.cell.miss img{border-color:#d33}
.missing{width:112px;height:112px;display:flex;align-items:center;justify-content:center;background:#eee;border:4px solid #bbb}
.plots{display:flex;gap:24px;flex-wrap:wrap}
"""


def page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{CSS}</style></head><body>{body}</body></html>'
    )


def cell(uri: str | None, caption: str, kind: str = "") -> str:
    img = f'<img src="{uri}" alt="{html.escape(caption)}">' if uri else '<div class="missing">unreadable</div>'
    return f'<div class="cell {kind}">{img}<div>{html.escape(caption)}</div></div>'


def kv_table(d: dict) -> str:
    rows = []
    for key, value in d.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(text)}</td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>"


def line_svg(values: list[float], title: str, w: int = 420, h: int = 240) -> str:
    pad = 36
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    n = len(values)
    xs = [pad + (w - 2 * pad) * (i / max(1, n - 1)) for i in range(n)]
    ys = [h - pad - (h - 2 * pad) * (v or 0.0) for v in values]
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#3366cc"><title>P@{i + 1} = {values[i]}</title></circle>'
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    )
    axis = (
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#444"/>'
        f'<text x="{pad - 4}" y="{pad + 4}" font-size="10" text-anchor="end">1.0</text>'
        f'<text x="{pad - 4}" y="{h - pad}" font-size="10" text-anchor="end">0</text>'
        f'<text x="{pad}" y="{h - pad + 14}" font-size="10">1</text>'
        f'<text x="{w - pad}" y="{h - pad + 14}" font-size="10" text-anchor="end">{n}</text>'
    )
    return (
        f'<figure><figcaption>{html.escape(title)}</figcaption><svg width="{w}" '
        f'height="{h}" role="img">{axis}<polyline points="{pts}" fill="none" stroke="#3366cc" stroke-width="2"/>{dots}</svg></figure>'
    )


def histogram_svg(
    series: dict[str, list[int]], colours: dict[str, str], lo: float, hi: float, title: str, w: int = 420, h: int = 240
) -> str:
    pad = 36
    bins = len(next(iter(series.values())))
    top = max(1, max(max(v) for v in series.values()))
    bw = (w - 2 * pad) / bins
    bars = []
    for j, (name, counts) in enumerate(series.items()):
        for i, c in enumerate(counts):
            if c:
                bh = (h - 2 * pad) * c / top
                x = pad + i * bw + j * bw / len(series)
                bars.append(
                    f'<rect x="{x:.1f}" y="{h - pad - bh:.1f}" width="{bw / len(series):.1f}" height="{bh:.1f}" '
                    f'fill="{colours[name]}"><title>{name}: {c}</title></rect>'
                )
    legend = "".join(
        f'<text x="{w - pad}" y="{pad + 14 * j}" font-size="11" text-anchor="end" fill="{colours[name]}">{html.escape(name)}</text>'
        for j, name in enumerate(series)
    )
    axis = (
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>'
        f'<text x="{pad}" y="{h - pad + 14}" font-size="10">{lo}</text>'
        f'<text x="{w - pad}" y="{h - pad + 14}" font-size="10" text-anchor="end">{hi}</text>'
    )
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption><svg width=\"{w}\" "
        f"height=\"{h}\" role=\"img\">{axis}{''.join(bars)}{legend}</svg></figure>"
    )


def read_thumbnails(spark, paths: dict[int, str]) -> dict[int, str | None]:
    """``image_id -> data URI`` for the given paths, read through Hadoop's filesystem."""
    from cbir_lib.common import fs

    out = {}
    for image_id, path in paths.items():
        try:
            out[image_id] = thumbnail_uri(fs.read_bytes(spark, path))
        except Exception:  # noqa: BLE001 - a vanished file gets a placeholder
            out[image_id] = None
    return out


def render_report(spark, per_query, emb, summary: dict, manifest: dict, n_queries: int, seed: int) -> str:
    """The evaluation gallery for ``n_queries`` sampled queries."""
    from pyspark.sql import functions as F

    sample = (
        per_query.select("image_id", "label", "precision_at_k", "neighbor_ids", "scores", "relevant")
        .orderBy(F.xxhash64("image_id", F.lit(seed)))
        .limit(n_queries)
        .collect()
    )
    wanted = {r.image_id for r in sample} | {i for r in sample for i in (r.neighbor_ids or []) if i is not None}
    paths = {r.image_id: r.path for r in emb.filter(F.col("image_id").isin(list(wanted))).select("image_id", "path").collect()}
    thumbs = read_thumbnails(spark, paths)
    blocks = []
    for r in sample:
        cells = [cell(thumbs.get(r.image_id), f"query · {r.label} · P@k {r.precision_at_k:.2f}", "query")]
        for rank, (nid, score, rel) in enumerate(zip(r.neighbor_ids or [], r.scores or [], r.relevant or [], strict=False), start=1):
            if nid is None or score is None or score != score:
                continue  # padding (fewer than k neighbours); ids are signed hashes, any value is valid
            cells.append(cell(thumbs.get(nid), f"#{rank} {score:.3f}", "hit" if rel else "miss"))
        blocks.append(f"<div class=\"q\">{''.join(cells)}</div>")
    k = summary["k"]
    m = {
        key: summary.get(key) for key in ("queries", "precision_at_k", "map_at_k", "map", "recall_at_k", "mean_precision_at_k", "ns_score")
    }
    plots = line_svg(summary.get("precision_curve") or [], f"precision@i, i = 1..{k}")
    hist = summary.get("score_histogram")
    if hist and (any(hist["relevant"]) or any(hist["irrelevant"])):
        plots += histogram_svg(
            {"relevant": hist["relevant"], "irrelevant": hist["irrelevant"]},
            {"relevant": "#2a9d3a", "irrelevant": "#d33"},
            hist["range"][0],
            hist["range"][1],
            "scores of the top-k neighbours",
        )
    lineage = {key: manifest.get(key) for key in manifest if key not in ("config", "metrics", "packages", "timings")}
    per_class = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{v['queries']}</td><td>{v['precision_at_k']}</td><td>{v['map_at_k']}</td></tr>"
        for c, v in summary.get("per_class", {}).items()
    )
    body = (
        f"<h1>cbir evaluation {html.escape(manifest['run_id'])}</h1>"
        f"<p>{m['queries']} queries against ground truth <code>{html.escape(str(manifest.get('labels')))}</code>, mode "
        f"<code>{html.escape(manifest['mode'])}</code>, k = {k}. Frames: <b style=\"color:#2a9d3a\">relevant</b>, "
        f"<b style=\"color:#d33\">not relevant</b>.</p>"
        f"<h2>Metrics</h2>{kv_table(m)}"
        f"<div class=\"plots\">{plots}</div>"
        '<h2>Per class</h2><table class="kv"><tr><td><b>class</b></td><td><b>queries</b></td>'
        f"<td><b>P@k</b></td><td><b>mAP@k</b></td></tr>{per_class}</table>"
        f"<h2>Sampled queries</h2>{''.join(blocks)}"
        f"<h2>Lineage</h2>{kv_table(lineage)}"
        f"<h2>Definitions</h2>{kv_table(summary.get('definitions', {}))}"
    )
    return page(f"cbir evaluation {manifest['run_id']}", body)
