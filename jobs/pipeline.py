"""spark-submit jobs/pipeline.py --stages build_index,neighbors [--images DIR] [section.field=value ...]

Several stages in one Spark session, in the pipeline's order: each commits its own
snapshot exactly as its own job would, and a stage whose inputs are unchanged is a no-op
as usual. One session instead of one per stage saves a JVM start-up and the first jobs'
warm-up per stage (measured in benchmarks/results/all_pairs.json), which a small
collection pays for nothing. Prints one JSON summary line per stage.
"""

from __future__ import annotations

import contextlib
import json
import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/pipeline.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import load_config, parse_args, run_job, sample_dir_for

ORDER = ("ingest", "extract", "build_index", "neighbors", "evaluate", "dedup")


def _stages(text: str) -> list[str]:
    from cbir_lib.config import ConfigError

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in ORDER]
    if unknown or not names:
        raise ConfigError(f"--stages: {', '.join(unknown) or 'none given'}; choose from {', '.join(ORDER)}")
    return sorted(set(names), key=ORDER.index)  # always the pipeline's order: inputs before outputs


def main(argv: list[str] | None = None) -> list[dict]:
    def extra(parser):
        parser.add_argument("--stages", required=True, help=f"comma-separated, any of {', '.join(ORDER)}")
        parser.add_argument("--images", help="ingest: directory or Hadoop URI (shorthand for ingest.images)")

    args, overrides = parse_args("pipeline", __doc__, argv, extra)
    if args.images:
        overrides.append(f"ingest.images={args.images}")
    cfg = load_config(args.config, overrides)
    stages = _stages(args.stages)

    def run(spark) -> list[dict]:
        # Each stage's module is imported only when it runs (extract's imports TensorFlow).
        def stage_fn(stage: str):
            if stage == "ingest":
                from cbir_lib.images.run import run_ingest

                return lambda: run_ingest(spark, cfg, cfg.ingest.images or sample_dir_for(cfg))
            if stage == "extract":
                from cbir_lib.features.run import run_extract as fn
            elif stage == "build_index":
                from cbir_lib.index.run import run_build_index as fn
            elif stage == "neighbors":
                from cbir_lib.neighbors.run import run_neighbors as fn
            elif stage == "evaluate":
                from cbir_lib.evaluate.run import run_evaluate as fn
            else:
                from cbir_lib.dedup.run import run_dedup as fn
            return lambda: fn(spark, cfg)

        def run_stage(stage: str) -> dict:
            m = stage_fn(stage)()
            print(
                json.dumps(
                    {
                        "stage": stage,
                        "run_id": m.get("run_id"),
                        "counts": m.get("counts")
                        if stage != "build_index"
                        else {k: v for k, v in (m.get("counts") or {}).items() if k != "per_cell"},
                        "method": m.get("method"),
                        "nprobe": m.get("nprobe"),
                        "recall_at_k": m.get("recall_at_k"),
                        "wall_seconds": m.get("wall_seconds") or m.get("build_seconds"),
                        "output": m.get("output"),
                        "noop": m.get("noop", False),
                    }
                ),
                flush=True,
            )
            return m

        # build_index keeps the store it wrote in process for the neighbours stage to take
        # (cbir_lib/index/store.py: handing_off), dropped once that stage has run.
        from cbir_lib.index.store import handing_off

        both = {"build_index", "neighbors"} <= set(stages)
        with handing_off() if both else contextlib.nullcontext():
            out = [run_stage(s) for s in (stages[: stages.index("neighbors") + 1] if both else [])]
        out += [run_stage(s) for s in stages[len(out) :]]
        return out

    return run_job(run, cfg, args.verbose)


if __name__ == "__main__":
    main(sys.argv[1:])
