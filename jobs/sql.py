"""cbir sql --output ROOT ["SELECT ..."] [--csv | --parquet FILE] [--run ID] [--views]

SQL over the latest committed snapshot of every table under ROOT, in DuckDB (no Spark):
images, embeddings, index_store, neighbors, pairs, dedup_clusters, dedup_pairs,
evaluation_per_query, evaluation_per_class, runs, and the convenience views
neighbors_by_path, duplicate_groups and failures. With no query, an interactive prompt
(statements end with ';', '.views' lists the views, '.quit' leaves).

    spark-submit jobs/sql.py --engine spark --output ROOT "SELECT ..."   # the same views in Spark SQL
    spark-submit jobs/sql.py --engine spark --output ROOT --ddl          # CREATE TABLE statements for a metastore
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/sql.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import load_config, parse_args, run_job


def _emit(table, args) -> None:
    """An Arrow table as text, CSV on stdout, or a Parquet file."""
    if args.parquet:
        import pyarrow.parquet as pq

        pq.write_table(table, args.parquet)
        print(f"{table.num_rows} rows -> {args.parquet}")
    elif args.csv:
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, sys.stdout.buffer)
    else:
        import pandas as pd

        with pd.option_context(
            "display.max_rows", args.max_rows, "display.max_columns", 50, "display.width", 200, "display.max_colwidth", 80
        ):
            print(table.to_pandas().to_string(index=False, max_rows=args.max_rows))
        print(f"({table.num_rows} rows)")


def _prompt(run_sql, describe) -> None:
    buf: list[str] = []
    while True:
        try:
            line = input("cbir> " if not buf else "  ..> ")
        except EOFError:
            print()
            return
        if not buf and line.strip() in (".quit", ".exit"):
            return
        if not buf and line.strip() == ".views":
            print(describe())
            continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            text = "\n".join(buf).rstrip().rstrip(";")
            buf = []
            try:
                run_sql(text)
            except Exception as exc:  # noqa: BLE001 - a bad statement at the prompt is reported, not fatal
                print(f"error: {str(exc).splitlines()[0]}")


def main(argv: list[str] | None = None):
    def extra(p):
        p.add_argument("query", nargs="?", help="one SQL statement; none: an interactive prompt")
        p.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb")
        p.add_argument("--run", help="read this run id's snapshot wherever a table has it, instead of _LATEST")
        p.add_argument("--csv", action="store_true", help="write the result as CSV on stdout")
        p.add_argument("--parquet", metavar="FILE", help="write the result to this Parquet file")
        p.add_argument("--views", action="store_true", help="list the views and what they read")
        p.add_argument("--ddl", action="store_true", help="(spark) print CREATE TABLE statements for a metastore")
        p.add_argument("--max-rows", type=int, default=50)

    args, overrides = parse_args("cbir sql", __doc__, argv, extra)
    cfg = load_config(args.config, overrides)
    root = cfg.run.output_root
    if args.engine == "duckdb":
        if args.ddl:
            raise SystemExit("cbir sql: --ddl writes Spark metastore statements; use --engine spark")
        from cbir_lib.sql.duck import connect, describe

        con, resolved = connect(root, args.run)

        def run_sql(text: str):
            _emit(con.execute(text).fetch_arrow_table(), args)

        if args.views:
            print(describe(resolved))
        elif args.query:
            run_sql(args.query)
        else:
            _prompt(run_sql, lambda: describe(resolved))
        return resolved

    def spark_main(spark):
        from cbir_lib.sql.duck import describe
        from cbir_lib.sql.spark import metastore_ddl, register_views

        if args.ddl:
            print("\n".join(metastore_ddl(spark, root, args.run)))
            return None
        resolved = register_views(spark, root, args.run)
        if args.views:
            print(describe(resolved))
        elif args.query:
            _emit(spark.sql(args.query).toArrow(), args)
        else:
            _prompt(lambda text: _emit(spark.sql(text).toArrow(), args), lambda: describe(resolved))
        return resolved

    return run_job(spark_main, cfg, args.verbose)


if __name__ == "__main__":
    main(sys.argv[1:])
