"""``cbir serve``: a local, read-only search page over an output root's latest runs.

- ``/``: drop or pick an image; it is embedded with the run's own model (as ``cbir query``
  does; the model loads once per process) and its top-k shown as thumbnails with scores
  and paths. Clicking a result shows its stored neighbours from the neighbours table.
- ``/duplicates`` and ``/failures``: the ``duplicate_groups`` and ``failures`` views of
  ``cbir sql`` (:mod:`cbir_lib.sql.duck`).

Safety: the server binds to 127.0.0.1 unless told otherwise and writes nothing. Image bytes
are served only for paths in the images table (by id, or by a path checked against it), so
no other file can be read through it. An upload is the request body itself, read into
memory up to ``max_upload_bytes`` (413 past it); a bad one gets a message, never a trace.
"""

from __future__ import annotations

import html
import io
import logging
import threading

log = logging.getLogger(__name__)

THUMB = 256


def make_app(output_root: str, model_cache: str | None = None, k: int = 12, max_upload_bytes: int = 20 << 20):
    """The Starlette application serving ``output_root``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from cbir_lib.common import layout
    from cbir_lib.query import QueryError, query_bytes, read_bytes
    from cbir_lib.sql.duck import connect
    from cbir_lib.sql.views import RUN_TABLES

    lock = threading.Lock()  # one DuckDB connection and one TensorFlow model: one request at a time
    cached: dict = {}

    def views():
        """The views, made again only when a table's ``_LATEST`` moved: a run committed while
        the server runs is seen, and a thumbnail request reads a few pointers, not every manifest."""
        pointers = []
        for table in RUN_TABLES:
            try:
                pointers.append(read_bytes(f"{output_root.rstrip('/')}/{table}/{layout.LATEST}"))
            except QueryError:
                pointers.append(None)
        if cached.get("pointers") != pointers:
            cached["con"], cached["pointers"] = connect(output_root)[0], pointers
        return cached["con"]

    def rows(sql: str, params: list | None = None) -> list[tuple]:
        with lock:
            return views().execute(sql, params or []).fetchall()

    def path_of(image_id: int) -> str | None:
        got = rows("SELECT path FROM images WHERE image_id = ? AND status = 'ok'", [image_id])
        return got[0][0] if got else None

    def id_of(path: str) -> int | None:
        got = rows("SELECT image_id FROM images WHERE path = ? AND status = 'ok'", [path])
        return int(got[0][0]) if got else None

    async def index(request: Request):
        return HTMLResponse(PAGE)

    async def api_query(request: Request):
        data = bytearray()
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > max_upload_bytes:
                return JSONResponse({"error": f"the upload is larger than {max_upload_bytes >> 20} MB"}, status_code=413)
        if not data:
            return JSONResponse({"error": "no image in the request (drop or pick a file)"}, status_code=400)
        try:
            with lock:
                hits, used = query_bytes(output_root, bytes(data), k=k, model_cache=model_cache)
        except QueryError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # noqa: BLE001 - logged here, a message there
            log.exception("cbir serve: query failed")
            return JSONResponse({"error": f"the query failed ({type(exc).__name__}); see the server's log"}, status_code=500)
        return JSONResponse(
            {
                "hits": [{"rank": h.rank, "image_id": str(h.image_id), "score": round(h.score, 4), "path": h.path} for h in hits],
                "used": {k_: v for k_, v in used.items() if isinstance(v, (str, int, float, type(None)))},
            }
        )

    async def api_neighbors(request: Request):
        try:
            image_id = int(request.query_params.get("id", ""))
        except ValueError:
            return JSONResponse({"error": "id: an image id (a whole number) is needed"}, status_code=400)
        path = path_of(image_id)
        if path is None:
            return JSONResponse({"error": f"no image {image_id} in the images table"}, status_code=404)
        got = rows("SELECT rank, neighbor_id, score, neighbor_path FROM neighbors_by_path WHERE image_id = ? ORDER BY rank", [image_id])
        return JSONResponse(
            {
                "image_id": str(image_id),
                "path": path,
                "hits": [{"rank": r, "image_id": str(n), "score": round(float(s), 4), "path": p} for r, n, s, p in got],
            }
        )

    async def image(request: Request):
        q = request.query_params
        if "id" in q:
            try:
                image_id = int(q["id"])
            except ValueError:
                return Response("id: a whole number", status_code=400, media_type="text/plain")
            path = path_of(image_id)
        else:
            path = q.get("path")
            path = path if path and id_of(path) is not None else None
        if path is None:  # only files the images table holds, never an arbitrary path
            return Response("not an image of this collection", status_code=404, media_type="text/plain")
        try:
            return Response(_thumbnail(read_bytes(path)), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
        except Exception:  # noqa: BLE001 - a vanished or unreadable file
            return Response("the image could not be read", status_code=404, media_type="text/plain")

    async def duplicates(request: Request):
        got = rows(
            "SELECT cluster_id, size, representative_path, member_paths FROM duplicate_groups ORDER BY size DESC, cluster_id LIMIT 200"
        )
        body = "".join(
            f"<tr><td>{c}</td><td>{n}</td><td>{_thumb_html(rep)}</td><td>{''.join(_thumb_html(m) for m in members[:12])}</td></tr>"
            for c, n, rep, members in got
        )
        return HTMLResponse(
            _frame(
                "Duplicate groups",
                f"<table><tr><th>cluster</th><th>size</th><th>kept</th><th>members</th></tr>{body}</table>"
                if got
                else "<p>No duplicate groups (run cbir dedup).</p>",
            )
        )

    async def failures(request: Request):
        got = rows("SELECT path, stage, error_code, error FROM failures ORDER BY stage, error_code, path LIMIT 1000")
        body = "".join(
            f"<tr><td>{html.escape(str(p))}</td><td>{s}</td><td>{html.escape(str(c))}</td><td>{html.escape(str(e or ''))}</td></tr>"
            for p, s, c, e in got
        )
        return HTMLResponse(
            _frame(
                "Failures",
                f"<table><tr><th>path</th><th>stage</th><th>code</th><th>error</th></tr>{body}</table>" if got else "<p>No failures.</p>",
            )
        )

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/query", api_query, methods=["POST"]),
            Route("/api/neighbors", api_neighbors),
            Route("/image", image),
            Route("/duplicates", duplicates),
            Route("/failures", failures),
        ]
    )


def _thumbnail(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.thumbnail((THUMB, THUMB))
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=85)
        return out.getvalue()


def _thumb_html(path: str) -> str:
    from urllib.parse import quote

    return f'<img src="/image?path={quote(str(path), safe="")}" alt="{html.escape(str(path))}" title="{html.escape(str(path))}">'


STYLE = """body{font-family:sans-serif;margin:1.5em}nav a{margin-right:1em}#drop{border:2px dashed #888;padding:2em;text-align:center}
.grid{display:flex;flex-wrap:wrap;gap:.6em}.hit{width:180px;font-size:12px;cursor:pointer}.hit img{max-width:176px;max-height:176px}
.err{color:#b00}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}td img{max-height:96px}"""


def _frame(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        f"<title>cbir: {title}</title><style>{STYLE}</style></head><body>"
        f"<nav><a href='/'>search</a><a href='/duplicates'>duplicate groups</a><a href='/failures'>failures</a></nav>"
        f"<h1>{title}</h1>{body}</body></html>"
    )


PAGE = _frame(
    "Search",
    """
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<p id="status"></p>
<div id="results" class="grid"></div>
<h2 id="nbtitle"></h2>
<div id="neighbours" class="grid"></div>
<script>
const status = document.getElementById('status');
function card(h, onclick) {
  const d = document.createElement('div'); d.className = 'hit';
  const img = document.createElement('img'); img.src = '/image?id=' + h.image_id; img.alt = h.path;
  const cap = document.createElement('div'); cap.textContent = '#' + h.rank + '  ' + h.score + '  ' + h.path;
  d.appendChild(img); d.appendChild(cap); d.dataset.id = h.image_id; d.dataset.path = h.path;
  if (onclick) d.addEventListener('click', () => onclick(h));
  return d;
}
async function neighbours(h) {
  const r = await fetch('/api/neighbors?id=' + h.image_id); const j = await r.json();
  const box = document.getElementById('neighbours'); box.replaceChildren();
  if (!r.ok) { status.textContent = j.error; status.className = 'err'; return; }
  document.getElementById('nbtitle').textContent = 'Stored neighbours of ' + j.path;
  j.hits.forEach(x => box.appendChild(card(x, neighbours)));
}
async function search(file) {
  status.className = ''; status.textContent = 'searching...';
  const r = await fetch('/api/query', {method: 'POST', body: file});
  const j = await r.json();
  const box = document.getElementById('results'); box.replaceChildren();
  if (!r.ok) { status.textContent = j.error; status.className = 'err'; return; }
  status.textContent = j.hits.length + ' results';
  j.hits.forEach(h => box.appendChild(card(h, neighbours)));
}
document.getElementById('file').addEventListener('change', e => { if (e.target.files[0]) search(e.target.files[0]); });
const drop = document.getElementById('drop');
drop.addEventListener('dragover', e => e.preventDefault());
drop.addEventListener('drop', e => { e.preventDefault(); if (e.dataTransfer.files[0]) search(e.dataTransfer.files[0]); });
</script>""",
)


def run(output_root: str, host: str = "127.0.0.1", port: int = 8080, model_cache: str | None = None) -> None:
    import uvicorn

    log.info("cbir serve: http://%s:%d/ over %s (read-only)", host, port, output_root)
    uvicorn.run(make_app(output_root, model_cache), host=host, port=port, log_level="warning")
