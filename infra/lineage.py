"""Lineage catalog: artifacts, stage runs and input→output edges across runs (SQLite in the run root).

An artifact is a stage output (``RUN/STAGE/OUTPUT``) or an external input (a WARC folder, a model
file), identified by URI and carrying its content hash as an attribute. A stage that reused an
earlier run's outputs from the cache has artifacts of its own (``file://RUN_ROOT/RUN/STAGE/OUTPUT``,
files stored where they were computed: ``meta.path``); equal content is a relation
(:meth:`LineageCatalog.same_content`), never a merge, so each artifact's upstream is its own.
Edges link every input of a stage run to every output it produced, so ``upstream``/``downstream``
answer "where did this checkpoint come from?" and "what was built from this data?".
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from infra.markdown import markdown_table

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
                        out.get("stage", stage), name, _now(),
                        json.dumps({"n_files": len(out["files"]), **({"path": out["path"]} if "path" in out else {})}),
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
        return [_decode_stage_run(r) for r in rows]

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

    def stage_run(self, run_id: str, stage: str) -> dict | None:
        """One stage run (config, inputs, outputs, metrics decoded), or None."""
        with self._conn() as c:
            row = c.execute("SELECT * FROM stage_runs WHERE run_id=? AND stage=?", (run_id, stage)).fetchone()
        return _decode_stage_run(row) if row else None

    def consumers(self, uri: str) -> list[tuple[str, str]]:
        """(run_id, stage) of every stage run that read this artifact."""
        with self._conn() as c:
            rows = c.execute("SELECT DISTINCT run_id, stage FROM edges WHERE src=? ORDER BY run_id, stage", (uri,))
            return [(r[0], r[1]) for r in rows]

    def reusers(self, run_id: str, stage: str) -> list[tuple[str, str]]:
        """(run_id, stage) of the stage runs that reused this one's outputs from the cache."""
        with self._conn() as c:
            rows = c.execute("SELECT run_id, stage FROM stage_runs WHERE cached_from=? ORDER BY run_id",
                             (f"{run_id}/{stage}",))
            return [(r[0], r[1]) for r in rows]

    def same_content(self, uri: str) -> list[dict]:
        """Other artifacts whose content hash equals this one's ("same content as"; never merged)."""
        with self._conn() as c:
            rows = c.execute(
                "SELECT b.* FROM artifacts a JOIN artifacts b ON a.hash=b.hash AND a.uri<>b.uri WHERE a.uri=? "
                "ORDER BY b.run_id, b.stage, b.name", (uri,)).fetchall()
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


def _decode_stage_run(row: sqlite3.Row) -> dict:
    d = dict(row)
    for k in ("config", "inputs", "outputs", "metrics", "code_version"):
        d[k] = json.loads(d[k])
    return d


def artifact_path(artifact: dict) -> Path:
    """Where an artifact's files are (a reused stage's outputs live in the run that computed them)."""
    stored = json.loads(artifact.get("meta") or "{}").get("path")
    return Path(stored) if stored else Path(artifact["uri"].removeprefix("file://"))


def lineage_graph(catalog: LineageCatalog, focus: list[tuple[str, str]], depth: int = 50) -> dict:
    """The full upstream and downstream graph, across runs, of the given stage runs.

    Nodes: ``{"id", "kind": "stage" | "external", ...}``; a stage node carries its run, stage,
    ``cached_from`` and outputs (name, hash, and the other artifacts with the same content).
    Edges: ``{"src", "dst", "label", "kind": "data" | "reuse"}`` — data flows from a producer (stage
    run or external input) to the stage run that read it; ``reuse`` links a computed stage run to a
    later run that reused its outputs from the cache.
    """
    nodes: dict[str, dict] = {}
    edges: dict[tuple[str, str, str], dict] = {}

    def stage_node(run_id: str, stage: str) -> dict | None:
        node_id = f"{run_id}/{stage}"
        if node_id not in nodes:
            run = catalog.stage_run(run_id, stage)
            if run is None:
                return None
            outputs = {
                name: {"uri": out["uri"], "hash": out["hash"],
                       "same_as": [label(a) for a in catalog.same_content(out["uri"])]}
                for name, out in run["outputs"].items()
            }
            nodes[node_id] = {"id": node_id, "kind": "stage", "run_id": run_id, "stage": stage,
                              "cached_from": run["cached_from"], "outputs": outputs, "inputs": run["inputs"],
                              "finished_at": run["finished_at"]}
        return nodes[node_id]

    def add_edge(src: str, dst: str, edge_label: str, kind: str = "data") -> None:
        edges.setdefault((src, dst, edge_label), {"src": src, "dst": dst, "label": edge_label, "kind": kind})

    def walk_up(node: dict, level: int) -> None:
        if level > depth:
            return
        if node["cached_from"]:
            src_run, _, src_stage = node["cached_from"].partition("/")
            src = stage_node(src_run, src_stage)
            if src is not None:
                add_edge(src["id"], node["id"], "reused", "reuse")
                walk_up(src, level + 1)
        for name, inp in node["inputs"].items():
            if inp.get("stage"):
                producer = stage_node(inp["run_id"], inp["stage"])
                if producer is not None:
                    add_edge(producer["id"], node["id"], inp.get("output") or name)
                    walk_up(producer, level + 1)
                    continue
            ext_id = inp["uri"]
            nodes.setdefault(ext_id, {"id": ext_id, "kind": "external", "name": name, "hash": inp["hash"],
                                      "path": inp["uri"].removeprefix("file://")})
            add_edge(ext_id, node["id"], name)

    def walk_down(node: dict, level: int) -> None:
        if level > depth:
            return
        nexts = [(stage_node(r, s), "reused", "reuse") for r, s in catalog.reusers(node["run_id"], node["stage"])]
        for name, out in node["outputs"].items():
            nexts += [(stage_node(r, s), name, "data") for r, s in catalog.consumers(out["uri"])]
        for child, edge_label, kind in nexts:
            if child is None:
                continue
            new = (node["id"], child["id"], edge_label) not in edges
            add_edge(node["id"], child["id"], edge_label, kind)
            if new:
                walk_down(child, level + 1)

    for run_id, stage in focus:
        node = stage_node(run_id, stage)
        if node is not None:
            walk_up(node, 1)
            walk_down(node, 1)
    return {"nodes": list(nodes.values()), "edges": list(edges.values())}


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


def _provenance(run: dict) -> str:
    return f"reused from {run['cached_from']}" if run["cached_from"] else "computed"


def _same_content(ra: dict, rb: dict) -> bool:
    """Equal outputs (names and content hashes); a stage without outputs: equal config and inputs."""
    oa = {k: v["hash"] for k, v in ra["outputs"].items()}
    ob = {k: v["hash"] for k, v in rb["outputs"].items()}
    if oa or ob:
        return oa == ob
    ia = {k: v["hash"] for k, v in ra["inputs"].items()}
    ib = {k: v["hash"] for k, v in rb["inputs"].items()}
    return ia == ib and ra["config"] == rb["config"]


def compare_runs(
    catalog: LineageCatalog, run_a: str, run_b: str, execution_metrics: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Any]:
    """What differs between two runs, by content: the one answer the CLI, the explorer and a sweep use.

    Two stage runs whose outputs have equal content hashes are the *same*, however produced (computed,
    or reused from this or that run): how each side got its outputs is provenance, never a difference.
    A stage that ran on one side only is listed as not run on the other, never counted as a difference.

    Returns ``{"run_a", "run_b", "stages", "differ", "same", "not_run_in_a", "not_run_in_b", "summary"}``.
    Each entry of ``stages``: ``stage``, ``result`` (``same`` | ``differs`` | ``not_run_in_a`` |
    ``not_run_in_b``), ``a``/``b`` (provenance: ``computed``, ``reused from RUN/STAGE``, or None where it
    did not run), and ``rows``: ``{"kind": config | input | output | metric, "key", "a", "b"}``, each with
    unequal sides. A differing stage's rows say what differs; a same stage's rows hold only config keys
    that differ without changing the outputs. ``execution_metrics`` (stage → metric names that describe
    how a run computed, e.g. a cache hit or a wall time) are never compared, nor are ``seconds*`` metrics.
    """
    a = {r["stage"]: r for r in catalog.stage_runs(run_a)}
    b = {r["stage"]: r for r in catalog.stage_runs(run_b)}
    if not a:
        raise KeyError(f"run {run_a!r} is not in the lineage catalog")
    if not b:
        raise KeyError(f"run {run_b!r} is not in the lineage catalog")
    ignore = {stage: set(names) for stage, names in (execution_metrics or {}).items()}
    stages: list[dict[str, Any]] = []
    for stage in list(dict.fromkeys([*a, *b])):
        ra, rb = a.get(stage), b.get(stage)
        entry: dict[str, Any] = {"stage": stage, "a": _provenance(ra) if ra else None,
                                 "b": _provenance(rb) if rb else None, "rows": []}
        stages.append(entry)
        if ra is None or rb is None:
            entry["result"] = "not_run_in_a" if ra is None else "not_run_in_b"
            continue
        same = _same_content(ra, rb)
        entry["result"] = "same" if same else "differs"
        rows = entry["rows"]
        ca, cb = flatten(ra["config"]), flatten(rb["config"])
        rows += [{"kind": "config", "key": k, "a": ca.get(k), "b": cb.get(k)}
                 for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
        if same:
            continue
        for kind in ("inputs", "outputs"):
            for k in sorted(set(ra[kind]) | set(rb[kind])):
                ha, hb = ra[kind].get(k, {}).get("hash"), rb[kind].get(k, {}).get("hash")
                if ha != hb:
                    rows.append({"kind": kind[:-1], "key": k, "a": ha, "b": hb})
        skip = ignore.get(stage, set())
        ma, mb = flatten(ra["metrics"]), flatten(rb["metrics"])
        rows += [{"kind": "metric", "key": k, "a": ma.get(k), "b": mb.get(k)} for k in sorted(set(ma) | set(mb))
                 if ma.get(k) != mb.get(k) and not k.startswith("seconds") and k not in skip]
    by = {r: [e["stage"] for e in stages if e["result"] == r] for r in ("differs", "same", "not_run_in_a", "not_run_in_b")}
    result = {"run_a": run_a, "run_b": run_b, "stages": stages, "differ": by["differs"], "same": by["same"],
              "not_run_in_a": by["not_run_in_a"], "not_run_in_b": by["not_run_in_b"]}
    result["summary"] = _summary(result)
    return result


def _summary(c: dict[str, Any]) -> str:
    same = [e for e in c["stages"] if e["result"] == "same"]
    reused = any(e["a"] != "computed" or e["b"] != "computed" for e in same)
    if c["differ"]:
        head = f"{len(c['differ'])} stage(s) differ ({', '.join(c['differ'])})"
        if same:
            head += f"; {len(same)} with the same content"
    elif same:
        head = f"no differences{' (reused)' if reused else ''}: {len(same)} stage(s) run in both have the same content"
    else:
        head = "no stage ran in both runs"
    for key, run in (("not_run_in_b", c["run_b"]), ("not_run_in_a", c["run_a"])):
        if c[key]:
            head += f"; not run in {run}: {', '.join(c[key])}"
    return head


def _row_table(a: Any, b: Any, run_a: str, run_b: str) -> list[str] | None:
    """Two lists of row dicts (a funnel: ``[{"step", "documents"}, ...]``) side by side as a table, keyed by
    their first column; None when neither side is such a list."""
    if not any(isinstance(v, list) and v and all(isinstance(r, dict) for r in v) for v in (a, b)):
        return None
    rows_a, rows_b = (v if isinstance(v, list) else [] for v in (a, b))
    columns = list(dict.fromkeys(k for r in [*rows_a, *rows_b] if isinstance(r, dict) for k in r))
    key, values = columns[0], columns[1:]
    by_a = {r.get(key): r for r in rows_a if isinstance(r, dict)}
    by_b = {r.get(key): r for r in rows_b if isinstance(r, dict)}
    header = [key, *(f"{c} ({run})" for c in values for run in (run_a, run_b))]
    body = [[k, *(side.get(k, {}).get(c, "") for c in values for side in (by_a, by_b))]
            for k in dict.fromkeys([*by_a, *by_b])]
    return markdown_table(header, body)


def _show(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return repr(value)


def diff_runs(catalog: LineageCatalog, run_a: str, run_b: str,
              execution_metrics: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Lines for ``refinery lineage diff``: a summary, then each stage by content, provenance beside it."""
    c = compare_runs(catalog, run_a, run_b, execution_metrics)
    lines = [f"{run_a} vs {run_b}: {c['summary']}"]
    for e in c["stages"]:
        if e["result"] not in ("same", "differs"):
            continue
        prov = f"both {e['a']}" if e["a"] == e["b"] else f"{run_a}: {e['a']}, {run_b}: {e['b']}"
        lines.append(f"{e['stage']}: {'same content' if e['result'] == 'same' else 'differs'} ({prov})")
        for row in e["rows"]:
            key = f"{e['stage']}.{row['key']}" if row["kind"] == "config" else row["key"]
            note = " (outputs unchanged)" if e["result"] == "same" else ""
            table = _row_table(row["a"], row["b"], run_a, run_b)
            if table:
                lines += [f"  {row['kind']} {key}:{note}", *(f"    {line}" for line in table)]
                continue
            lines.append(f"  {row['kind']} {key}: {_show(row['a'])} -> {_show(row['b'])}{note}")
    for key, run in (("not_run_in_b", run_b), ("not_run_in_a", run_a)):
        if c[key]:
            lines.append(f"not run in {run}: {', '.join(c[key])}")
    return lines
