"""spark-submit jobs/extract.py --config conf/default.yaml [section.field=value ...]

Embeds the latest images snapshot into the embeddings table under ``run.output_root``.
Resumable: a killed run, started again, skips every chunk already committed.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("extract", __doc__, argv)
    cfg = load_config(args.config, overrides)
    from cbir_lib.features.extract import run_extract

    manifest = run_job(lambda spark: run_extract(spark, cfg), cfg, args.verbose)
    print(
        json.dumps(
            {
                "stage": "extract",
                "run_id": manifest["run_id"],
                "counts": manifest["counts"],
                "images_per_second": manifest.get("images_per_second"),
                "output": manifest.get("output"),
                "noop": manifest.get("noop", False),
            }
        )
    )
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
