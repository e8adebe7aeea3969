"""spark-submit jobs/train.py --config conf/default.yaml [section.field=value ...]

Trains the head of Lin et al. (hidden layer, B sigmoid code units, classifier) on the
labelled embeddings, fed from Parquet to tf.data by Petastorm, into
``models/run=<id>/`` (model.keras, head.npz, manifest). Apply it with
``cbir extract extract.head=<output_root>/models``.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("train", __doc__, argv)
    cfg = load_config(args.config, overrides)
    from cbir_lib.finetune.train import run_train

    manifest = run_job(lambda spark: run_train(spark, cfg), cfg, args.verbose)
    print(
        json.dumps(
            {
                "stage": "train",
                "run_id": manifest["run_id"],
                "classes": len(manifest["classes"]),
                "bits": manifest["bits"],
                "data": {k: manifest["data"][k] for k in ("train", "validation")},
                "metrics": manifest["metrics"],
                "output": manifest.get("output"),
            }
        )
    )
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
