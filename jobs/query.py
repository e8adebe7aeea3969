"""cbir query IMAGE [--k 10] [--html out.html] [--output ROOT] [--nprobe N]

An analyst's single-image lookup over a finished run: the image is embedded with that
run's own model, pooling and whitening, looked up in the forests of the nearest cells,
and the top-k printed as rank, score and path. No Spark is started.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/query.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import load_config, parse_args


def printable(text) -> str:
    """A path as a terminal may print it: control characters (an ANSI escape in a file name
    could rewrite the screen) shown as ``\\xNN``, everything else as it is."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text))


def main(argv: list[str] | None = None) -> list:
    def extra(p):
        p.add_argument("image", help="path or URI of the query image")
        p.add_argument("--k", type=int, default=10)
        p.add_argument("--nprobe", type=int, default=None, help="cells to probe (default neighbors.nprobe)")
        p.add_argument("--html", help="also write an HTML page with thumbnails here")
        p.add_argument(
            "--hierarchical",
            action="store_true",
            help="Hamming candidates from the run's binary codes, re-ranked by the floats (needs extract.head or extract.binary_codes)",
        )

    args, overrides = parse_args("cbir query", __doc__, argv, extra)
    cfg = load_config(args.config, overrides)
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cbir_lib.query import render_html, run_query

    hits, used = run_query(
        cfg.run.output_root,
        args.image,
        args.k,
        args.nprobe or cfg.neighbors.nprobe,
        candidates=cfg.neighbors.code_candidates if args.hierarchical else None,
        model_cache=cfg.extract.model_cache,
        hierarchical=args.hierarchical,
    )
    how = f"{used['vectors_scored']} Hamming candidates re-ranked" if args.hierarchical else f"{used['nprobe']} of {used['cells']} cells"
    print(f"top {len(hits)} of {args.image} (model {used['model']}, pooling {used['pooling']}, " f"{how}, index {used['index_run_id']})")
    print(f"{'rank':>4}  {'score':>7}  path")
    for h in hits:
        print(f"{h.rank:>4}  {h.score:>7.4f}  {printable(h.path)}")
    if args.html:
        with open(args.html, "w", encoding="utf-8") as fh:
            fh.write(render_html(args.image, hits, used))
        print(f"html: {os.path.abspath(args.html)}")
    return hits


if __name__ == "__main__":
    main(sys.argv[1:])
