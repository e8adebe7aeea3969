"""cbir serve --output ROOT [--port 8080] [--host 127.0.0.1]

A local search page over the latest runs of ROOT: drop an image to see its nearest images
(embedded with the run's own model, as ``cbir query``), click one for its stored
neighbours; duplicate groups and failures from the same views as ``cbir sql``. Read-only;
binds to 127.0.0.1 unless ``--host`` says otherwise. No Spark is started.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/serve.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import load_config, parse_args, setup_logging


def main(argv: list[str] | None = None) -> None:
    def extra(p):
        p.add_argument("--port", type=int, default=8080)
        p.add_argument("--host", default="127.0.0.1", help="the address to bind (default: this machine only)")

    args, overrides = parse_args("cbir serve", __doc__, argv, extra)
    cfg = load_config(args.config, overrides)
    setup_logging(args.verbose)
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cbir_lib.serve import run
    from cbir_lib.sql.duck import connect

    connect(cfg.run.output_root)  # a root with no runs fails here, with its reason
    run(cfg.run.output_root, args.host, args.port, cfg.extract.model_cache)


if __name__ == "__main__":
    main(sys.argv[1:])
