"""SQL views over an output root: one committed snapshot per table, in DuckDB and Spark SQL."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from cbir_lib.sql.duck import connect
from cbir_lib.sql.views import NoRuns


def _snapshot(root: Path, table: str, run: str, rows: dict, sub: str = "", manifest: dict | None = None, latest: bool = True) -> None:
    d = root / table / f"run={run}" / sub if sub else root / table / f"run={run}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), d / "part-00000.parquet")
    snap = root / table / f"run={run}"
    if manifest is not False:
        (snap / "_manifest.json").write_text(json.dumps({"stage": table, "run_id": run, **(manifest or {})}))
    if latest:
        (root / table / "_LATEST").write_text(run)


def _images(n: int, failed: int = 0) -> dict:
    return {
        "image_id": list(range(n)),
        "path": [f"/p/{i}.jpg" for i in range(n)],
        "status": ["ok"] * (n - failed) + ["failed"] * failed,
        "error": [None] * (n - failed) + ["truncated: cut short"] * failed,
    }


def test_views_read_only_the_latest_committed_snapshot(tmp_path):
    _snapshot(tmp_path, "images", "r1", _images(5), manifest={"counts": {"input": 5}})
    _snapshot(tmp_path, "images", "r2", _images(8, failed=2), manifest={"counts": {"input": 8}})  # kept older + newer
    nb = {"image_id": [0, 0, 1], "rank": [1, 2, 1], "neighbor_id": [1, 2, 0], "score": [0.9, 0.8, 0.9]}
    _snapshot(tmp_path, "neighbors", "n1", nb, manifest={"images_run_id": "r2", "recall_at_k": 0.97})
    _snapshot(tmp_path, "neighbors", "n2", {**nb, "rank": [1, 2, 3]}, manifest=False, latest=True)  # _LATEST names an unfinished commit
    con, resolved = connect(str(tmp_path))
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 8  # not 13: one snapshot
    assert "neighbors" not in resolved.views and any("run=n2 has no manifest" in n for n in resolved.notes)
    assert any(n.startswith("dedup_clusters:") for n in resolved.notes)  # a stage that never ran: a note, no view
    assert con.execute("SELECT count(*) FROM failures").fetchone()[0] == 2
    runs = con.execute("SELECT table_name, run_id, in_view FROM runs ORDER BY table_name, run_id").fetchall()
    assert runs == [("images", "r1", False), ("images", "r2", True), ("neighbors", "n1", False)]
    # --run pins a snapshot where the table has it
    con, _ = connect(str(tmp_path), run="r1")
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 5


def test_neighbors_by_path_joins_the_paths(tmp_path):
    _snapshot(tmp_path, "images", "r1", _images(3))
    _snapshot(tmp_path, "neighbors", "n1", {"image_id": [0, 1], "rank": [1, 1], "neighbor_id": [2, 0], "score": [0.5, 0.7]})
    con, _ = connect(f"file:{tmp_path}")
    got = con.execute("SELECT query_path, rank, neighbor_path, score FROM neighbors_by_path ORDER BY query_path").fetchall()
    assert [(a, r, b) for a, r, b, _ in got] == [("/p/0.jpg", 1, "/p/2.jpg"), ("/p/1.jpg", 1, "/p/0.jpg")]


def test_a_root_with_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(NoRuns, match="no committed run"):
        connect(str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "sql", "--output", str(tmp_path), "SELECT 1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 1 and "no committed run" in r.stderr and "Traceback" not in r.stderr


def test_cli_prints_csv_and_writes_parquet(tmp_path):
    _snapshot(tmp_path / "out", "images", "r1", _images(4, failed=1))
    cmd = [sys.executable, "-m", "jobs.cli", "sql", "--output", str(tmp_path / "out")]
    r = subprocess.run([*cmd, "--csv", "SELECT path, error_code FROM failures"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert list(csv.reader(r.stdout.splitlines())) == [["path", "error_code"], ["/p/3.jpg", "truncated"]]
    r = subprocess.run(
        [*cmd, "--parquet", str(tmp_path / "x.parquet"), "SELECT * FROM images"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0 and pq.read_table(tmp_path / "x.parquet").num_rows == 4
    r = subprocess.run(cmd, input="SELECT count(*) AS n\n FROM images;\n.quit\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "(1 rows)" in r.stdout and " 4" in r.stdout


# ------------------------------------------------------------------ on the demo's own output


@pytest.mark.slow
def test_the_readme_queries_on_the_demo_output(demo_out):
    out, summary = demo_out
    con, resolved = connect(str(out))
    for view in (
        "images",
        "embeddings",
        "index_store",
        "neighbors",
        "dedup_clusters",
        "dedup_pairs",
        "evaluation_per_query",
        "evaluation_per_class",
        "neighbors_by_path",
        "duplicate_groups",
        "failures",
        "runs",
    ):
        assert view in resolved.views or view == "runs", (view, resolved.notes)
    # Counts are the latest manifests' counts.
    assert con.execute("SELECT count(*) FROM neighbors").fetchone()[0] == summary["neighbors"]["counts"]["rows"]
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == summary["ingest"]["counts"]["input"]
    # Every edited copy's first neighbour by path, against groups.csv: the demo's own check.
    groups = {}
    with open(out / "sample" / "groups.csv", newline="") as fh:
        for g in csv.DictReader(fh):
            groups[os.path.join(str(out / "sample" / "images"), g["file"])] = g["group"]
    rows = con.execute(README_QUERIES["neighbours of a photo"].replace("WHERE query_path LIKE '%astronaut%'", "WHERE rank = 1")).fetchall()
    top1 = {q.replace("file:", "", 1): n.replace("file:", "", 1) for q, _, n, _ in rows}
    copies = [q for q in top1 if q in groups and "__original" not in q]
    hits = sum(groups[q] == groups.get(top1[q]) for q in copies)
    assert (hits, len(copies)) == (summary["copy_hits"], summary["copies"]) and hits >= 0.9 * len(copies)
    # The failures by code: the demo's three broken files.
    failures = dict(con.execute(README_QUERIES["failures by code"]).fetchall())
    assert failures == summary["ingest"]["counts"]["failure_reasons"]
    # Duplicate groups: as many as dedup committed, largest first.
    groups_ = con.execute(README_QUERIES["largest duplicate groups"]).fetchall()
    assert len(groups_) == min(10, summary["dedup"]["counts"]["clusters"]) and groups_[0][1] == max(g[1] for g in groups_)
    per_class = con.execute(README_QUERIES["precision per class"]).fetchall()
    assert per_class and all(0 <= p <= 1 for _, p in per_class)
    recall = con.execute(README_QUERIES["recall over the runs"]).fetchall()
    assert recall and recall[-1][1] == summary["neighbors"]["recall_at_k"]
    # Every README query runs.
    for q in README_QUERIES.values():
        con.execute(q).fetchall()


@pytest.mark.slow
def test_register_views_in_spark_gives_the_same_counts_as_duckdb(spark, demo_out):
    from cbir_lib.sql.spark import metastore_ddl, register_views

    out, _ = demo_out
    con, resolved = connect(str(out))
    got = register_views(spark, str(out))
    assert set(got.views) == set(resolved.views)
    for view in resolved.views:
        assert spark.sql(f"SELECT count(*) AS n FROM {view}").first().n == con.execute(f"SELECT count(*) FROM {view}").fetchone()[0], view
    assert spark.sql("SELECT count(*) AS n FROM runs").first().n == con.execute("SELECT count(*) FROM runs").fetchone()[0]
    for q in README_QUERIES.values():  # the README's queries run unchanged in Spark SQL
        spark.sql(q).collect()
    ddl = metastore_ddl(spark, str(out))
    assert any("CREATE TABLE cbir.neighbors USING parquet LOCATION" in s for s in ddl)


def _readme_queries() -> dict[str, str]:
    """The DuckDB queries of the README's SQL section, by the heading comment above each."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- sql-duckdb -->", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    out, name, lines = {}, None, []
    for line in block.splitlines():
        if line.startswith("-- "):
            if name:
                out[name] = "\n".join(lines).strip().rstrip(";")
            name, lines = line[3:].strip(), []
        elif line.strip():
            lines.append(line)
    if name:
        out[name] = "\n".join(lines).strip().rstrip(";")
    return out


README_QUERIES = _readme_queries() if "<!-- sql-duckdb -->" in (ROOT / "README.md").read_text(encoding="utf-8") else {}
