"""spark-submit jobs/ingest.py --config conf/default.yaml [--images DIR_OR_URI] [section.field=value ...]

Builds or incrementally updates the images table under ``run.output_root``.
Without ``--images`` (and without ``ingest.images``) it ingests the embedded sample.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job, sample_dir_for


def _extra(parser):
    parser.add_argument("--images", help="directory or Hadoop URI to ingest (shorthand for ingest.images)")


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("ingest", __doc__, argv, _extra)
    if args.images:
        overrides.append(f"ingest.images={args.images}")
    cfg = load_config(args.config, overrides)
    from cbir_lib.images.ingest import run_ingest

    images = cfg.ingest.images or sample_dir_for(cfg)
    manifest = run_job(lambda spark: run_ingest(spark, cfg, images), cfg, args.verbose)
    print(
        json.dumps(
            {
                "stage": "ingest",
                "run_id": manifest["run_id"],
                "counts": manifest["counts"],
                "output": manifest.get("output"),
                "noop": manifest.get("noop", False),
            }
        )
    )
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
