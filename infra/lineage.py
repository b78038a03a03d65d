"""Lineage catalog: artifacts, stage runs and input→output edges across runs (SQLite in the run root).

An artifact is a stage output (``RUN/STAGE/OUTPUT``) or an external input (a WARC folder, a model
file), identified by URI and carrying its content hash. Edges link every input of a stage run to
every output it produced, so ``upstream``/``downstream`` answer "where did this checkpoint come
from?" and "what was built from this data?".
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

DB_NAME = "lineage.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    uri TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    kind TEXT NOT NULL,            -- stage_output | external
    run_id TEXT, stage TEXT, name TEXT,
    created_at TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS artifacts_hash ON artifacts(hash);
CREATE TABLE IF NOT EXISTS stage_runs (
    run_id TEXT NOT NULL, stage TEXT NOT NULL,
    cache_key TEXT NOT NULL, status TEXT NOT NULL,
    cached_from TEXT, config TEXT NOT NULL, inputs TEXT NOT NULL, outputs TEXT NOT NULL,
    metrics TEXT NOT NULL, code_version TEXT NOT NULL,
    started_at TEXT, finished_at TEXT, manifest_path TEXT,
    PRIMARY KEY (run_id, stage)
);
CREATE INDEX IF NOT EXISTS stage_runs_key ON stage_runs(cache_key);
CREATE TABLE IF NOT EXISTS edges (
    src TEXT NOT NULL, dst TEXT NOT NULL, run_id TEXT NOT NULL, stage TEXT NOT NULL,
    PRIMARY KEY (src, dst, run_id, stage)
);
CREATE INDEX IF NOT EXISTS edges_dst ON edges(dst);
"""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class LineageCatalog:
    def __init__(self, run_root: str | Path):
        self.path = Path(run_root) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.executescript(_SCHEMA)

    @contextmanager
    def _conn(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection in WAL mode (readers never block the writer) that waits up to 60 s for a lock.

        ``write=True`` wraps the block in one ``BEGIN IMMEDIATE`` transaction: it takes the write
        lock up front (so it cannot fail half way on a lock upgrade), and another process sees
        all of it or nothing; an exception rolls it back.
        """
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            if not write:
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    # ---- writes -------------------------------------------------------------------------
    def record_stage_run(self, manifest: dict) -> None:
        """Register a completed stage run: its outputs as artifacts, inputs as artifacts, and edges."""
        run_id, stage = manifest["run_id"], manifest["stage"]
        with self._conn(write=True) as c:
            input_uris = []
            for name, inp in manifest["inputs"].items():
                kind = "stage_output" if inp.get("stage") else "external"
                c.execute(
                    "INSERT OR IGNORE INTO artifacts(uri, hash, kind, run_id, stage, name, created_at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (inp["uri"], inp["hash"], kind, inp.get("run_id"), inp.get("stage"), name, _now()),
                )
                input_uris.append(inp["uri"])
            for name, out in manifest["outputs"].items():
                c.execute(
                    "INSERT OR REPLACE INTO artifacts(uri, hash, kind, run_id, stage, name, created_at, meta) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (
                        out["uri"], out["hash"], "stage_output", out.get("run_id", run_id),
                        out.get("stage", stage), name, _now(), json.dumps({"n_files": len(out["files"])}),
                    ),
                )
                for src in input_uris:
                    c.execute(
                        "INSERT OR IGNORE INTO edges(src, dst, run_id, stage) VALUES (?,?,?,?)",
                        (src, out["uri"], run_id, stage),
                    )
            c.execute(
                "INSERT OR REPLACE INTO stage_runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id, stage, manifest["cache_key"], "completed", manifest.get("cached_from"),
                    json.dumps(manifest["config"], sort_keys=True), json.dumps(manifest["inputs"], sort_keys=True),
                    json.dumps(manifest["outputs"], sort_keys=True), json.dumps(manifest["metrics"], default=str),
                    json.dumps(manifest["code_version"]), manifest["timings"].get("started_at"),
                    manifest["timings"].get("finished_at"), manifest.get("manifest_path"),
                ),
            )

    # ---- reads --------------------------------------------------------------------------
    def find_cached(self, cache_key: str) -> list[dict]:
        """Completed stage runs with this cache key, newest first (computed ones, not cache hits)."""
        with self._conn() as c:
            rows = c.execute(
                "SELECT run_id, stage, manifest_path FROM stage_runs WHERE cache_key=? AND cached_from IS NULL "
                "ORDER BY finished_at DESC",
                (cache_key,),
            ).fetchall()
        return [dict(r) for r in rows]

    def stage_runs(self, run_id: str) -> list[dict]:
        with self._conn() as c:
            rows = c.execute("SELECT * FROM stage_runs WHERE run_id=? ORDER BY started_at", (run_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for k in ("config", "inputs", "outputs", "metrics", "code_version"):
                d[k] = json.loads(d[k])
            out.append(d)
        return out

    def runs(self) -> list[str]:
        with self._conn() as c:
            return [r[0] for r in c.execute("SELECT DISTINCT run_id FROM stage_runs ORDER BY run_id")]

    def artifact(self, uri: str) -> dict | None:
        with self._conn() as c:
            row = c.execute("SELECT * FROM artifacts WHERE uri=?", (uri,)).fetchone()
        return dict(row) if row else None

    def resolve(self, ref: str) -> list[dict]:
        """Artifacts matching a URI, ``RUN/STAGE[/OUTPUT]``, a path, or a hash prefix."""
        with self._conn() as c:
            parts = ref.strip("/").split("/")
            if ref.startswith("file://") or ref.startswith("/"):
                uri = ref if ref.startswith("file://") else Path(ref).resolve().as_uri()
                rows = c.execute("SELECT * FROM artifacts WHERE uri=?", (uri,)).fetchall()
            elif ref.startswith("sha256:") or (len(ref) >= 8 and all(ch in "0123456789abcdef" for ch in ref)):
                prefix = ref if ref.startswith("sha256:") else "sha256:" + ref
                rows = c.execute("SELECT * FROM artifacts WHERE hash LIKE ?", (prefix + "%",)).fetchall()
            elif len(parts) in (2, 3):
                q = "SELECT * FROM artifacts WHERE kind='stage_output' AND run_id=? AND stage=?"
                args: list[Any] = parts[:2]
                if len(parts) == 3:
                    q += " AND name=?"
                    args.append(parts[2])
                rows = c.execute(q, args).fetchall()
            else:
                rows = []
        return [dict(r) for r in rows]

    def parents(self, uri: str) -> list[dict]:
        with self._conn() as c:
            rows = c.execute(
                "SELECT a.*, e.run_id AS via_run, e.stage AS via_stage FROM edges e JOIN artifacts a ON a.uri=e.src "
                "WHERE e.dst=? ORDER BY a.uri",
                (uri,),
            ).fetchall()
        return [dict(r) for r in rows]

    def children(self, uri: str) -> list[dict]:
        with self._conn() as c:
            rows = c.execute(
                "SELECT a.*, e.run_id AS via_run, e.stage AS via_stage FROM edges e JOIN artifacts a ON a.uri=e.dst "
                "WHERE e.src=? ORDER BY a.uri",
                (uri,),
            ).fetchall()
        return [dict(r) for r in rows]

    def tree(self, uri: str, direction: str, depth: int = 20) -> list[tuple[int, dict]]:
        """Depth-first (level, artifact) list walking ``up`` (parents) or ``down`` (children)."""
        step = self.parents if direction == "up" else self.children
        out: list[tuple[int, dict]] = []
        seen: set[str] = set()

        def walk(u: str, level: int) -> None:
            if level > depth:
                return
            for a in step(u):
                out.append((level, a))
                if a["uri"] not in seen:
                    seen.add(a["uri"])
                    walk(a["uri"], level + 1)

        walk(uri, 1)
        return out


def label(artifact: dict) -> str:
    """Short human label: ``RUN/STAGE/OUTPUT  sha256:abcd1234`` or the external path."""
    h = artifact["hash"].split(":", 1)[-1][:12]
    if artifact["kind"] == "stage_output":
        return f"{artifact['run_id']}/{artifact['stage']}/{artifact['name']}  [{h}]"
    return f"{artifact['uri'].removeprefix('file://')}  [{h}] (external {artifact['name']})"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def diff_runs(catalog: LineageCatalog, run_a: str, run_b: str) -> list[str]:
    """Lines describing what differs between two runs: stages, config keys, input and output hashes."""
    a = {r["stage"]: r for r in catalog.stage_runs(run_a)}
    b = {r["stage"]: r for r in catalog.stage_runs(run_b)}
    if not a:
        raise KeyError(f"run {run_a!r} is not in the lineage catalog")
    if not b:
        raise KeyError(f"run {run_b!r} is not in the lineage catalog")
    lines: list[str] = []
    for stage in list(dict.fromkeys([*a, *b])):
        if stage not in a or stage not in b:
            lines.append(f"{stage}: only in {run_a if stage in a else run_b}")
            continue
        ra, rb = a[stage], b[stage]
        ca, cb = flatten(ra["config"]), flatten(rb["config"])
        changes = []
        for k in sorted(set(ca) | set(cb)):
            if ca.get(k) != cb.get(k):
                changes.append(f"  config {stage}.{k}: {ca.get(k)!r} -> {cb.get(k)!r}")
        for k in sorted(set(ra["inputs"]) | set(rb["inputs"])):
            ha, hb = ra["inputs"].get(k, {}).get("hash"), rb["inputs"].get(k, {}).get("hash")
            if ha != hb:
                changes.append(f"  input {k}: {str(ha)[:19]} -> {str(hb)[:19]}")
        for k in sorted(set(ra["outputs"]) | set(rb["outputs"])):
            ha, hb = ra["outputs"].get(k, {}).get("hash"), rb["outputs"].get(k, {}).get("hash")
            if ha != hb:
                changes.append(f"  output {k}: {str(ha)[:19]} -> {str(hb)[:19]}")
        ma, mb = flatten(ra["metrics"]), flatten(rb["metrics"])
        for k in sorted(set(ma) | set(mb)):
            if ma.get(k) != mb.get(k) and not k.startswith("seconds"):
                changes.append(f"  metric {k}: {ma.get(k)!r} -> {mb.get(k)!r}")
        if ra["cached_from"] or rb["cached_from"]:
            changes.append(f"  cache: {ra['cached_from'] or 'computed'} | {rb['cached_from'] or 'computed'}")
        lines.append(f"{stage}: " + ("identical" if not changes else "changed"))
        lines.extend(changes)
    return lines
