"""The skeleton every stage runs on: one run of a stage, from its start to its commit.

Each stage reads the committed snapshots of the stages before it and commits one snapshot
of its own table (:mod:`cbir_lib.common.tables`). What they all do alike is here, once:

- the run id (``run.run_id``, or a new timestamp);
- the input runs it reads (``_LATEST``, or the pinned run id), each recorded in the
  manifest as ``<input>_run_id`` and ``<input>_commit``;
- the base run (its own table's snapshot it builds on or may find current);
- the no-op signature, derived from the config sections the stage declares
  (:func:`cbir_lib.config.signature`), never a hand-kept list of fields;
- :meth:`StageRun.current`: the base snapshot when it already answers this run (the same
  signature, the same input commits), with the reason logged when it does not;
- the manifest's common fields, and the commit with the run's ``keep_snapshots`` and
  ``pin_inputs``.

What a stage computes stays in its own package; a stage's adapter makes a
:class:`StageRun` with :meth:`StageRun.start` and hands it its inputs as it reads them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cbir_lib import config as config_mod
from cbir_lib.common import tables
from cbir_lib.common.lineage import new_run_id, package_versions
from cbir_lib.config import Config

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """One run of stage ``name`` into ``table`` (see the module's docstring)."""

    name: str
    cfg: Config
    table: str
    run_id: str
    signature: dict[str, Any]
    base_run: str | None
    base: dict | None  # the base run's manifest
    started: float
    inputs: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # name -> (run id, commit id)

    @classmethod
    def start(cls, spark, cfg: Config, name: str, table: str, declares: tuple[str, ...], **also: Any) -> "StageRun":
        """Begin a run: its id, its base snapshot, and its signature over the ``declares``
        config sections (and fields) plus ``also`` (what the output depends on beyond the
        config, such as a model's feature key). ``spark=None`` skips the base (tests)."""
        started = time.time()
        base_run = tables.base_run(spark, table, cfg.run) if spark is not None else None
        base = tables.read_manifest(spark, table, base_run) if base_run else None
        return cls(
            name=name,
            cfg=cfg,
            table=table,
            run_id=cfg.run.run_id or new_run_id(),
            signature={**config_mod.signature(cfg, declares), **also},
            base_run=base_run,
            base=base,
            started=started,
        )

    def sign(self, **also: Any) -> None:
        """Add what the output depends on that is known only after the start (a model's key)."""
        self.signature.update(also)

    def read_input(self, spark, table_uri: str, as_: str, produced_by: str) -> tuple[str, dict]:
        """The snapshot of input table ``table_uri`` this run reads (``_LATEST``, or the pinned
        run id), as ``(run id, manifest)``; recorded as input ``as_``. A clear error naming
        ``produced_by`` when there is none."""
        run_id = tables.input_run(spark, table_uri, self.cfg.run, produced_by)
        manifest = tables.read_manifest(spark, table_uri, run_id) or {}
        self.inputs[as_] = (run_id, tables.commit_of(manifest))
        return run_id, manifest

    def use_input(self, as_: str, manifest: dict) -> None:
        """Record an input whose manifest the stage found itself (the neighbours' index)."""
        self.inputs[as_] = (manifest.get("run_id"), tables.commit_of(manifest))

    def stale_because(self) -> str | None:
        """Why the base snapshot does not answer this run, or ``None`` when it does."""
        if self.base is None:
            return "no base snapshot"
        theirs = self.base.get("signature") or {}
        was, now = (lambda k: theirs.get(k, "<absent>")), (lambda k: self.signature.get(k, "<absent>"))
        changed = sorted(k for k in set(theirs) | set(self.signature) if was(k) != now(k))
        if changed:
            return "settings changed: " + ", ".join(f"{k} {was(k)!r} -> {now(k)!r}" for k in changed)
        for as_, (run_id, commit) in self.inputs.items():
            if self.base.get(f"{as_}_run_id") != run_id:
                return f"{as_} run {self.base.get(f'{as_}_run_id')} -> {run_id}"
            if self.base.get(f"{as_}_commit") != commit:
                return f"{as_} run {run_id} was committed again"
        return None

    def current(self) -> dict | None:
        """The base snapshot's manifest when it already answers this run (the same signature
        and the same input commits), else ``None``; the reason is logged either way."""
        why = self.stale_because()
        if why is None:
            log.info("%s: nothing to do; %s is current", self.name, self.base_run)
            return self.base
        if self.base is not None:
            log.info("%s: %s is not current: %s", self.name, self.base_run, why)
        return None

    def manifest(self, **fields: Any) -> dict:
        """The manifest's common fields (stage, run id, inputs, signature, config, package
        versions), then the stage's own ``fields``."""
        head: dict[str, Any] = {"stage": self.name, "run_id": self.run_id}
        for as_, (run_id, commit) in self.inputs.items():
            head[f"{as_}_run_id"] = run_id
            head[f"{as_}_commit"] = commit
        head.update(signature=self.signature, config=self.cfg.to_dict(), packages=package_versions())
        head.update(fields)
        return head

    def seconds(self) -> float:
        return round(time.time() - self.started, 3)

    def commit(
        self, spark, write: Callable[[str], None], manifest: dict, extra_files: dict[str, bytes] | None = None, staging: str | None = None
    ) -> str:
        """Commit the snapshot ``write(tmp)`` fills, atomically (:func:`tables.commit_dir`;
        ``staging``: its folder, written into already), keeping ``run.keep_snapshots`` and,
        under ``run.pin_inputs``, moving ``_LATEST`` forward only."""
        out = tables.commit_dir(
            spark,
            write,
            self.table,
            self.run_id,
            manifest,
            extra_files=extra_files,
            keep=self.cfg.run.keep_snapshots,
            forward_only=self.cfg.run.pin_inputs,
            staging=staging,
        )
        manifest["output"] = out
        return out

    def commit_frame(self, spark, df, manifest: dict, extra_files: dict[str, bytes] | None = None) -> str:
        """:meth:`commit` of one DataFrame written as the whole snapshot."""
        return self.commit(spark, lambda tmp: df.write.mode("overwrite").parquet(tmp), manifest, extra_files)
