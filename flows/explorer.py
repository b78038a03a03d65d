"""Lineage explorer: a small web app next to the Prefect UI (started by ``refinery serve``).

Pages (server-rendered HTML with the lineage graph as inline SVG, no JavaScript or network needed):

  /                          runs in the catalog, artifact lookup, run diff and token-trace forms
  /run/RUN                   every stage of a run with its full upstream and downstream graph across runs
  /stage/RUN/STAGE           one stage run: graph, inputs/outputs with content hashes, same-content
                             artifacts, config and metrics
  /artifact?ref=REF          an artifact (RUN/STAGE[/OUTPUT], path, hash prefix) → its stage run's page
  /diff?a=RUN_A&b=RUN_B      stages compared by content (same / differs / not run), reuse as provenance;
                             the config keys, input/output hashes and metrics of stages that differ
  /trace?shards=RUN/tokenize/shards&shard=NAME&seq=N
                             a token sequence → its document → its WARC record
  /api/graph?run=RUN | ?stage=RUN/STAGE   the graph as JSON
"""

from __future__ import annotations

import html
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from curation.megatron_shards import ShardError, list_shards, trace_tokens
from flows.registry import execution_metrics
from infra.access import allowed_hosts, check_exposure, is_loopback, refusal
from infra.lineage import LineageCatalog, artifact_path, compare_runs, flatten, label, lineage_graph
from infra.runstore import RunStoreError, check_name
from training.pretrain_stage import read_metrics

NODE_W, LINE_H, GAP_X, GAP_Y = 300, 16, 40, 70
STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2433;background:#f6f7fb}
header{background:#1d2433;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:center}
header a{color:#cfe0ff;text-decoration:none} main{padding:16px 20px}
table{border-collapse:collapse;margin:8px 0 16px;background:#fff} td,th{border:1px solid #d5d9e2;padding:4px 8px;
font-size:13px;text-align:left;vertical-align:top} th{background:#eef1f7} code{font-size:12px}
.graph{background:#fff;border:1px solid #d5d9e2;overflow:auto;max-height:80vh} form{display:inline-block;
margin:0 16px 8px 0;padding:8px;background:#fff;border:1px solid #d5d9e2} .muted{color:#667}
.err{color:#a40000;font-weight:600} h2{margin-top:22px} .intro{max-width:900px;line-height:1.45}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short(h: str | None) -> str:
    return (h or "").split(":", 1)[-1][:12]


def _q(**params: Any) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})


class TraceError(ValueError):
    """A token trace that does not name one ``tokenize/shards`` artifact of the run root and one of its shards."""


def shards_artifact(catalog: LineageCatalog, run_root: Path, ref: str) -> tuple[dict, Path, list[str]]:
    """The one ``tokenize/shards`` artifact ``ref`` names, its directory (inside ``run_root``) and its shards."""
    matches = [a for a in (catalog.resolve(ref) if ref else [])
               if a["kind"] == "stage_output" and (a["stage"], a["name"]) == ("tokenize", "shards")]
    if len(matches) != 1:
        known = [f"{r}/tokenize/shards" for r in reversed(catalog.runs()) if catalog.stage_run(r, "tokenize")]
        raise TraceError(f"{ref!r} names {len(matches)} token-shard artifacts; expected RUN/tokenize/shards of one run"
                         f" — this run root has {', '.join(known[:3]) or 'none yet (run the tokenize stage)'}"
                         + (f" and {len(known) - 3} more" if len(known) > 3 else ""))
    path = artifact_path(matches[0]).resolve()
    if not path.is_relative_to(run_root.resolve()):
        raise TraceError(f"{ref!r}: its files are recorded outside the run root")
    return matches[0], path, list_shards(path)


def trace(catalog: LineageCatalog, run_root: Path, ref: str, shard: str, seq: int) -> tuple[dict, dict]:
    """(shards artifact, document) of sequence ``seq`` of ``shard``, one of the shards the artifact lists."""
    artifact, path, names = shards_artifact(catalog, run_root, ref)
    if shard not in names:
        raise TraceError(f"{ref!r} has no shard {shard!r} (it has {len(names)}, e.g. {', '.join(names[:3])})")
    try:
        return artifact, trace_tokens(path, shard, seq)
    except (ShardError, IndexError, OSError) as exc:
        raise TraceError(str(exc)) from None


CURATION_COLUMNS = ("warc_record_id", "lang", "lang_score", "quality_score", "drop_reason", "dup_cluster",
                    "lines_removed")


def curation_rows(catalog: LineageCatalog, shards_input: dict, doc_ids: set[str]) -> dict[str, dict]:
    """doc_id → the curation columns (:data:`CURATION_COLUMNS`) of its row in the stage outputs the shards
    were tokenized from (pretrain ← tokenize ← e.g. dedup/data), found through the catalog."""
    import pyarrow.dataset as ds

    tokenize = catalog.stage_run(shards_input["run_id"], shards_input["stage"]) if shards_input.get("stage") else None
    found: dict[str, dict] = {}
    for inp in (tokenize or {}).get("inputs", {}).values():
        art = catalog.artifact(inp["uri"]) if inp.get("stage") else None
        path = artifact_path(art) if art else None
        if path is None or not any(path.glob("*.parquet")) or not doc_ids - found.keys():
            continue  # not a table of documents (e.g. the tokenizer), or nothing left to find
        data = ds.dataset(path, format="parquet")
        columns = ["doc_id", *(c for c in CURATION_COLUMNS if c in data.schema.names)]
        table = data.to_table(columns=columns, filter=ds.field("doc_id").isin(sorted(doc_ids)))
        found.update({r.pop("doc_id"): {**r, "from": f"{inp['run_id']}/{inp['stage']}/{inp['output']}"}
                      for r in table.to_pylist()})
    return found


def decisions(row: dict) -> dict:
    """A document's curation columns for display: set values only, scores to 3 decimals."""
    return {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items() if v is not None}


def skip_ledger(catalog: LineageCatalog, run: dict) -> list[dict]:
    """A stage run's skip ledger (pretrain's rolled-back spikes; empty for other stages), each skipped document with the curation
    decisions that let it in (its row's :data:`CURATION_COLUMNS` upstream; empty for non-web text)."""
    ledger = json.loads(run["metrics"].get("skip_ledger") or "[]")
    shards = next((i for i in run["inputs"].values() if (i.get("stage"), i.get("output")) == ("tokenize", "shards")), {})
    wanted = {d["doc_id"] for e in ledger for d in e.get("documents", []) if d.get("doc_id")}
    rows = curation_rows(catalog, shards, wanted) if wanted else {}
    return [{**e, "documents": [{**d, "curation": rows.get(d.get("doc_id"), {})} for d in e.get("documents", [])]}
            for e in ledger]


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)} · Refinery lineage</title>"
            f"<style>{STYLE}</style></head><body><header><b>Refinery lineage</b><a href='/'>runs</a>"
            f"<span class='muted'>{_e(title)}</span></header><main>{body}</main></body></html>")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def value_cell(value: Any) -> str:
    """A metric or config value as HTML: a list of row dicts (a funnel) as a small table, else its text."""
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        headers = list(dict.fromkeys(k for r in value for k in r))
        headers.sort(key=lambda h: all(isinstance(r.get(h), (int, float)) for r in value))  # labels first
        return table(headers, [[_e(r.get(h, "")) for h in headers] for r in value])
    return _e(value)


def fit_label(text: str) -> str:
    """``text`` cut to what fits a node box in 12 px monospace (about 7.3 px a character, 8 px padding a
    side), the cut marked with an ellipsis (the full text is the line's tooltip)."""
    room = int((NODE_W - 16) / 7.3)
    return text if len(text) <= room else text[: room - 1] + "…"


def _node_lines(node: dict) -> list[tuple[str, str]]:
    """(text, css colour) lines drawn inside a node box."""
    if node["kind"] == "external":
        return [(f"external: {node['name']}", "#1d2433"), (Path(node["path"]).name or node["path"], "#445"),
                (f"[{_short(node['hash'])}]", "#667")]
    status = f"reused from {node['cached_from']}" if node["cached_from"] else "computed"
    lines = [(f"{node['run_id']}/{node['stage']}", "#1d2433"), (status, "#b35900" if node["cached_from"] else "#2a7")]
    for name, out in node["outputs"].items():
        lines.append((f"→ {name} [{_short(out['hash'])}]", "#334"))
        if out["same_as"]:
            lines.append((f"   = same content as {len(out['same_as'])} other", "#667"))
    return lines


def render_svg(graph: dict, focus: set[str]) -> str:
    """Layered drawing of a lineage graph: producers above consumers, one row per layer."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    if not nodes:
        return "<p class='muted'>no lineage recorded</p>"
    parents: dict[str, list[str]] = {n: [] for n in nodes}
    for e in graph["edges"]:
        parents[e["dst"]].append(e["src"])
    layer: dict[str, int] = {}

    def depth(n: str, trail: frozenset = frozenset()) -> int:
        if n not in layer:
            layer[n] = 1 + max((depth(p, trail | {n}) for p in parents[n] if p not in trail), default=-1)
        return layer[n]

    for n in nodes:
        depth(n)
    rows: dict[int, list[str]] = {}
    for n in sorted(nodes, key=lambda n: (nodes[n].get("finished_at") or "", n)):
        rows.setdefault(layer[n], []).append(n)
    heights = {n: (len(_node_lines(nodes[n])) + 1) * LINE_H for n in nodes}
    pos: dict[str, tuple[float, float]] = {}
    y = 20.0
    for level in sorted(rows):
        for i, n in enumerate(rows[level]):
            pos[n] = (20 + i * (NODE_W + GAP_X), y)
        y += max(heights[n] for n in rows[level]) + GAP_Y
    width = 40 + max(len(r) for r in rows.values()) * (NODE_W + GAP_X) + NODE_W
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{y}' font-size='12' "
             "font-family='monospace'><defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' "
             "markerWidth='7' markerHeight='7' orient='auto'><path d='M0,0L10,5L0,10z' fill='#778'/></marker></defs>"]
    for e in graph["edges"]:
        (x1, y1), (x2, y2) = pos[e["src"]], pos[e["dst"]]
        x1, y1, x2 = x1 + NODE_W / 2, y1 + heights[e["src"]], x2 + NODE_W / 2
        reuse = e["kind"] == "reuse"
        stroke = "stroke='#d9822b' stroke-dasharray='6,4'" if reuse else "stroke='#778'"
        if layer[e["dst"]] - layer[e["src"]] > 1:  # skips layers: route around the boxes in between, on the right
            reach = (NODE_W / 2 + 16) / 0.75  # a cubic reaches 3/4 of the way to its control points
            bend = max(x1, x2) + reach
            d = f"M{x1},{y1} C{bend},{y1 + 30} {bend},{y2 - 30} {x2},{y2}"
            label_x = max(x1, x2) + 0.75 * reach + 4
        else:
            d = f"M{x1},{y1} C{x1},{y1 + 40} {x2},{y2 - 40} {x2},{y2}"
            label_x = (x1 + x2) / 2 + 4
        parts.append(f"<path class='edge edge-{e['kind']}' d='{d}' fill='none' {stroke} stroke-width='1.4' "
                     "marker-end='url(#arrow)'/>")
        parts.append(f"<text x='{label_x}' y='{(y1 + y2) / 2}' fill='#556'>{_e(e['label'])}</text>")
    for n, node in nodes.items():
        x, y0 = pos[n]
        fill = "#fff4e0" if node["kind"] == "external" else ("#e6f0ff" if n in focus else "#fff")
        href = f"/stage/{n}" if node["kind"] == "stage" else f"/artifact?{_q(ref=node['path'])}"
        parts.append(f"<a href='{_e(href)}'><g class='node node-{node['kind']}' data-id='{_e(n)}'>"
                     f"<rect x='{x}' y='{y0}' width='{NODE_W}' height='{heights[n]}' rx='6' fill='{fill}' "
                     f"stroke='{'#2b6cdf' if n in focus else '#99a'}' stroke-width='{2 if n in focus else 1}'/>")
        for i, (text, colour) in enumerate(_node_lines(node)):
            weight = " font-weight='bold'" if i == 0 else ""
            parts.append(f"<text x='{x + 8}' y='{y0 + (i + 1) * LINE_H + 2}' fill='{colour}'{weight}>"
                         f"<title>{_e(text)}</title>{_e(fit_label(text))}</text>")
        parts.append("</g></a>")
    parts.append("</svg>")
    return "<div class='graph'>" + "".join(parts) + "</div>"


class Explorer:
    """Page builders over one run root's lineage catalog."""

    def __init__(self, run_root: str | Path, prefect_url: str | None = None):
        self.run_root = Path(run_root).resolve()
        self.prefect_url = prefect_url

    @property
    def catalog(self) -> LineageCatalog:
        return LineageCatalog(self.run_root)

    def index(self) -> str:
        catalog = self.catalog
        runs = catalog.runs()
        rows = []
        for run in reversed(runs):
            stages = catalog.stage_runs(run)
            reused = sum(1 for s in stages if s["cached_from"])
            rows.append([f"<a href='/run/{_e(run)}'>{_e(run)}</a>", str(len(stages)), str(reused),
                         _e(stages[0]["started_at"] if stages else ""),
                         _e(", ".join(s["stage"] for s in stages))])
        newest = list(reversed(runs))

        def options(selected: str | None) -> str:
            return "".join(f"<option value='{_e(r)}'{' selected' if r == selected else ''}>{_e(r)}</option>"
                           for r in newest)

        prefect = (f" Runs are started, scheduled and watched in the <a href='{_e(self.prefect_url)}'>Prefect UI</a>."
                   if self.prefect_url else "")
        intro = ("<p class='intro'>Every stage run of this run root, and what each read and wrote. A run's page draws "
                 "its lineage across runs (an output reused from another run links there); <b>Diff</b> says what "
                 "differs between two runs by content; <b>Trace</b> follows a token sequence of a shard back to "
                 "its document and WARC record (a tokenize stage's page lists its shards)." + prefect + "</p>")
        forms = (
            "<form action='/artifact'>Artifact <input name='ref' size='40' placeholder='RUN/STAGE/OUTPUT, path or hash'>"
            " <button>show</button></form>"
            f"<form action='/diff'>Diff <select name='a'>{options(newest[1] if len(newest) > 1 else None)}</select>"
            f" vs <select name='b'>{options(newest[0] if newest else None)}</select>"
            " <button>compare</button></form>"
            "<form action='/trace'>Trace <input name='shards' placeholder='RUN/tokenize/shards' size='24'> "
            "<input name='shard' placeholder='shard name' size='22'> <input name='seq' placeholder='seq' size='4'>"
            " <button>trace</button></form>"
        )
        body = intro + forms + f"<p class='muted'>catalog: {_e(catalog.path)}</p>"
        body += table(["run", "stages", "reused", "started", "stages"], rows) if rows else "<p>No runs yet.</p>"
        return page("runs", body)

    def run(self, run_id: str) -> str:
        stages = self.catalog.stage_runs(run_id)
        if not stages:
            return page(run_id, f"<p class='err'>run {_e(run_id)} is not in the lineage catalog</p>")
        focus = [(run_id, s["stage"]) for s in stages]
        graph = lineage_graph(self.catalog, focus)
        rows = [[f"<a href='/stage/{_e(run_id)}/{_e(s['stage'])}'>{_e(s['stage'])}</a>",
                 _e(f"reused {s['cached_from']}" if s["cached_from"] else "computed"),
                 "<br>".join(f"{_e(k)} <code>{_short(v['hash'])}</code>" for k, v in s["outputs"].items())]
                for s in stages]
        report = (f" <a href='/report/{_e(run_id)}'>report (charts)</a>"
                  if (self.run_root / run_id / "report.html").is_file() else "")
        body = (f"<h2>Run {_e(run_id)}</h2><p>{report}</p>" + table(["stage", "status", "outputs"], rows)
                + f"<p><a href='/api/graph?{_q(run=run_id)}'>graph as JSON</a></p><h2>Lineage across runs</h2>"
                + render_svg(graph, {f"{r}/{s}" for r, s in focus}))
        return page(run_id, body)

    def stage(self, run_id: str, stage: str) -> str:
        catalog = self.catalog
        run = catalog.stage_run(run_id, stage)
        if run is None:
            return page(f"{run_id}/{stage}", f"<p class='err'>{_e(run_id)}/{_e(stage)} is not in the catalog</p>")
        in_rows = []
        for name, inp in run["inputs"].items():
            src = (f"<a href='/stage/{_e(inp['run_id'])}/{_e(inp['stage'])}'>{_e(inp['run_id'])}/{_e(inp['stage'])}"
                   f"/{_e(inp.get('output', ''))}</a>" if inp.get("stage") else _e(inp["uri"].removeprefix("file://")))
            in_rows.append([_e(name), src, f"<code>{_e(inp['hash'])}</code>"])
        out_rows = []
        for name, out in run["outputs"].items():
            art = catalog.artifact(out["uri"]) or {"uri": out["uri"], "meta": "{}"}
            same = "<br>".join(_e(label(a)) for a in catalog.same_content(out["uri"])) or "-"
            out_rows.append([_e(name), _e(artifact_path(art)), f"<code>{_e(out['hash'])}</code>", same])
        metrics = [[_e(k), value_cell(v)] for k, v in flatten(run["metrics"]).items()]
        config = [[_e(k), _e(v)] for k, v in flatten(run["config"]).items()]
        graph = lineage_graph(catalog, [(run_id, stage)])
        status = f"reused from {run['cached_from']}" if run["cached_from"] else "computed"
        body = (f"<h2>{_e(run_id)}/{_e(stage)} <span class='muted'>({_e(status)})</span></h2>"
                "<h2>Inputs</h2>" + table(["name", "from", "content hash"], in_rows)
                + "<h2>Outputs</h2>" + table(["name", "files at", "content hash", "same content as"], out_rows)
                + self.shards_section(run) + self.checkpoints_section(run)
                + "<h2>Lineage across runs</h2>" + render_svg(graph, {f"{run_id}/{stage}"})
                + self.skip_ledger_section(run)
                + "<h2>Metrics</h2>" + table(["metric", "value"], metrics)
                + "<h2>Config</h2>" + table(["key", "value"], config))
        return page(f"{run_id}/{stage}", body)

    def checkpoints_section(self, run: dict) -> str:
        """A training stage's checkpoints (Megatron ``iter_N`` and the exported ``hf`` model): step, loss, what
        they were trained from (upstream model and data, linked) and which stage runs used them (linked)."""
        models = {k: v for k, v in run["outputs"].items() if k in ("checkpoints", "hf")}
        if not models:
            return ""

        def link(inp: dict) -> str:
            if inp.get("stage"):
                return (f"<a href='/stage/{_e(inp['run_id'])}/{_e(inp['stage'])}'>{_e(inp['run_id'])}/{_e(inp['stage'])}"
                        f"/{_e(inp.get('output', ''))}</a>")
            return _e(Path(inp["uri"].removeprefix("file://")).name)

        model_in = [link(i) for n, i in run["inputs"].items() if n.endswith(("/hf", "/checkpoints"))]
        data_in = [link(i) for n, i in run["inputs"].items() if not n.endswith(("/hf", "/checkpoints", "/tokenizer"))]
        metrics_out = run["outputs"].get("metrics")
        metrics_file = Path(artifact_path(metrics_out)) / "metrics.jsonl" if metrics_out else None
        # the last record of a step (after a rollback) wins
        losses = {r["step"]: r["loss"] for r in read_metrics(metrics_file)[0]} if metrics_file and metrics_file.is_file() else {}
        m = run["metrics"]
        rows = []
        for name, out in models.items():
            used_by = "<br>".join(f"<a href='/stage/{_e(r)}/{_e(st)}'>{_e(r)}/{_e(st)}</a>"
                                  for r, st in self.catalog.consumers(out["uri"])) or "-"
            origin = "<br>".join((["model: " + x for x in model_in] or [f"model: {_e(m.get('init_from', 'random'))}"])
                                 + ["data: " + x for x in data_in])
            if name == "checkpoints":
                path = Path(artifact_path(out))
                for d in sorted(path.glob("iter_*")) if path.is_dir() else []:
                    step = int(d.name.split("_")[1])
                    loss = losses.get(step)
                    rows.append([_e(f"checkpoints/{d.name}"), _e(step), _e(f"{loss:.4f}" if loss is not None else "-"),
                                 origin, used_by])
            else:
                loss = m.get("final_loss", m.get("train_loss_last_10"))
                rows.append([_e(name), _e(m.get("steps", "-")),
                             _e(f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"), origin, used_by])
        return ("<h2>Checkpoints</h2>"
                + table(["checkpoint", "step", "train loss", "trained from", "used by"], rows))

    def shards_section(self, run: dict) -> str:
        """A tokenize stage's shards, each a link to the trace of its first token sequence."""
        if "shards" not in run["outputs"] or run["stage"] != "tokenize":
            return ""
        ref = f"{run['run_id']}/tokenize/shards"
        try:
            _, _, names = shards_artifact(self.catalog, self.run_root, ref)
        except TraceError as exc:
            return f"<h2>Shards</h2><p class='err'>{_e(exc)}</p>"
        rows = [[f"<a href='/trace?{_q(shards=ref, shard=n, seq=0)}'>{_e(n)}</a>"] for n in names]
        return (f"<h2>Shards ({len(names)})</h2><p class='muted'>Each link traces the shard's first token sequence "
                "to its document and WARC record; change <code>seq</code> in the address for others.</p>"
                + table(["shard (trace sequence 0)"], rows))

    def skip_ledger_section(self, run: dict) -> str:
        """Pretraining's rolled-back spikes, each with the documents of its skipped samples: doc_id (a link to
        the token trace), URL, WARC record and the curation decisions that let it in."""
        ledger = skip_ledger(self.catalog, run)
        if not ledger:
            return ""
        shards = next(f"{i['run_id']}/tokenize/shards" for i in run["inputs"].values() if i.get("stage") == "tokenize")
        parts = ["<h2>Spikes rolled back, and the documents they skipped</h2>"]
        for e in ledger:
            rows = [[f"<a href='/trace?{_q(shards=shards, shard=d['shard'], seq=d['seq'])}'>{_e(d.get('doc_id') or '?')}</a>",
                     _e(d.get("url") or ""), _e(d.get("source") or ""),
                     "<br>".join(f"{_e(k)}: {_e(v)}" for k, v in decisions(d["curation"]).items()) or
                     "<span class='muted'>not a web page (no curation row)</span>",
                     _e(", ".join(map(str, d["samples"])))] for d in e["documents"]]
            parts.append(f"<p>step {_e(e['step'])}: {_e(e['reason'])}; rolled back to step {_e(e['rolled_back_to'])}, "
                         f"{_e(e['num_skipped'])} samples skipped from then on</p>"
                         + table(["doc_id (trace)", "URL", "WARC record (file@offset)", "curation decisions", "samples"],
                                 rows))
        return "".join(parts)

    def report(self, kind: str, name: str) -> tuple[int, str]:
        """(status, page): the HTML report of run ``name`` (``kind`` "report") or of sweep ``name`` ("sweep")."""
        try:
            check_name(name, "run id" if kind == "report" else "sweep name")
        except RunStoreError as exc:
            return 400, page(kind, f"<p class='err'>{_e(exc)}</p>")
        path = self.run_root / name / "report.html" if kind == "report" else self.run_root / "sweeps" / name / "report.html"
        if not path.is_file():
            what = (f"run {name!r} has no report yet (written when its pipeline run ends; `refinery report {name}` "
                    "writes one)" if kind == "report" else f"no sweep {name!r} has finished under this run root")
            return 404, page(kind, f"<p class='err'>{_e(what)}</p>")
        return 200, path.read_text()

    def artifact(self, ref: str) -> tuple[str | None, str]:
        """(redirect target, page) for an artifact reference."""
        matches = self.catalog.resolve(ref)
        if len(matches) == 1 and matches[0]["kind"] == "stage_output":
            return "/stage/" + "/".join(urllib.parse.quote(matches[0][k], safe="") for k in ("run_id", "stage")), ""
        if len(matches) == 1:  # an external input: every stage run that read it
            focus = sorted(set(self.catalog.consumers(matches[0]["uri"])))
            graph = lineage_graph(self.catalog, focus)
            body = (f"<h2>External input {_e(matches[0]['uri'].removeprefix('file://'))}</h2>"
                    f"<p>content hash <code>{_e(matches[0]['hash'])}</code>; read by {len(focus)} stage run(s)</p>"
                    + render_svg(graph, {f"{r}/{s}" for r, s in focus}))
            return None, page("artifact", body)
        if not matches:
            return None, page("artifact", f"<p class='err'>no artifact matches {_e(ref)!s} (try RUN/STAGE[/OUTPUT], "
                                          "a path or a hash prefix)</p>")
        rows = [[f"<a href='/artifact?{_q(ref=a['uri'].removeprefix('file://'))}'>{_e(label(a))}</a>"] for a in matches]
        return None, page("artifact", f"<h2>{len(matches)} artifacts match {_e(ref)}</h2>" + table(["artifact"], rows))

    def diff(self, run_a: str, run_b: str) -> str:
        try:
            c = compare_runs(self.catalog, run_a, run_b, execution_metrics())
        except KeyError as exc:
            return page("diff", f"<p class='err'>{_e(exc.args[0])}</p>")

        def cell(value: Any) -> str:
            return f"<code>{_e(value)}</code>" if value is not None else ""

        def stage_link(run_id: str, stage: str, provenance: str | None) -> str:
            return (f"<a href='/stage/{_e(run_id)}/{_e(stage)}'>{_e(provenance)}</a>" if provenance
                    else "<span class='muted'>not run</span>")

        results = {"same": "same content", "differs": "differs", "not_run_in_a": f"not run in {run_a}",
                   "not_run_in_b": f"not run in {run_b}"}
        stage_rows = [[_e(e["stage"]), _e(results[e["result"]]), stage_link(run_a, e["stage"], e["a"]),
                       stage_link(run_b, e["stage"], e["b"])] for e in c["stages"]]
        rows = [[_e(e["stage"]), _e(r["kind"] + (" (outputs unchanged)" if e["result"] == "same" else "")),
                 _e(r["key"]), cell(r["a"]), cell(r["b"])] for e in c["stages"] for r in e["rows"]]
        body = (f"<h2>{_e(run_a)} vs {_e(run_b)}</h2><p class='diff-summary'>{_e(c['summary'])}</p>"
                "<p class='muted'>Compared by content: equal output hashes are the same, however produced "
                "(computed or reused); how each side got its outputs is shown, not counted.</p>"
                + table(["stage", "result", f"{run_a}", f"{run_b}"], stage_rows)
                + ("<h2>What differs</h2>" + table(["stage", "what", "key", run_a, run_b], rows) if rows else ""))
        return page(f"diff {run_a} {run_b}", body)

    def trace(self, shards: str, shard: str, seq: str) -> str:
        try:
            if not shard or not seq:
                _, _, names = shards_artifact(self.catalog, self.run_root, shards)
                rows = [[f"<a href='/trace?{_q(shards=shards, shard=n, seq=0)}'>{_e(n)}</a>"] for n in names]
                return page("trace", f"<h2>Shards of {_e(shards)}</h2>" + table(["shard (click: sequence 0)"], rows))
            if not seq.isdigit():
                raise TraceError(f"sequence {seq!r} is not a number")
            producer, doc = trace(self.catalog, self.run_root, shards, shard, int(seq))
        except TraceError as exc:
            return page("trace", f"<p class='err'>{_e(exc)}</p>")
        warc_file, _, offset = (doc["source"] or "").rpartition("@")
        rows = [["shard", _e(shard)], ["sequence", _e(seq)], ["tokens", _e(doc["tokens"])],
                ["doc_id", f"<code>{_e(doc['doc_id'])}</code>"], ["url", _e(doc["url"])],
                ["source", _e(doc["source"])]]
        if warc_file and offset.isdigit():
            rows.append(["WARC record", f"byte {_e(offset)} of {_e(warc_file)}"])
        body = ("<h2>Token sequence → document → WARC record</h2>" + table(["", ""], rows)
                + f"<p>Shards built by <a href='/stage/{_e(producer['run_id'])}/{_e(producer['stage'])}'>"
                f"{_e(producer['run_id'])}/{_e(producer['stage'])}</a></p>")
        return page("trace", body)

    def graph_json(self, query: dict[str, str]) -> dict:
        if "run" in query:
            focus = [(query["run"], s["stage"]) for s in self.catalog.stage_runs(query["run"])]
        else:
            run_id, _, stage = query.get("stage", "").partition("/")
            focus = [(run_id, stage)]
        return lineage_graph(self.catalog, focus)


def _handler(explorer: Explorer, hosts: list[str], expected: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep `refinery serve`'s console for what matters
            pass

        def _send(self, status: int, body: str, content_type: str = "text/html; charset=utf-8") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            refused = refusal(self.headers.get("Host"), self.headers.get("Authorization"), hosts, expected)
            if refused:
                status, reason = refused
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="refinery", charset="UTF-8"')
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(reason)))
                self.end_headers()
                self.wfile.write(reason.encode())
                return
            url = urllib.parse.urlparse(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/") if p]
            try:
                if not parts:
                    self._send(200, explorer.index())
                elif parts[0] == "run" and len(parts) == 2:
                    self._send(200, explorer.run(parts[1]))
                elif parts[0] == "stage" and len(parts) == 3:
                    self._send(200, explorer.stage(parts[1], parts[2]))
                elif parts == ["artifact"]:
                    target, body = explorer.artifact(query.get("ref", ""))
                    if target:
                        self.send_response(302)
                        self.send_header("Location", target)
                        self.end_headers()
                    else:
                        self._send(200, body)
                elif parts[0] in ("report", "sweep") and len(parts) == 2:
                    status, body = explorer.report(parts[0], parts[1])
                    self._send(status, body)
                elif parts == ["diff"]:
                    self._send(200, explorer.diff(query.get("a", ""), query.get("b", "")))
                elif parts == ["trace"]:
                    self._send(200, explorer.trace(query.get("shards", ""), query.get("shard", ""), query.get("seq", "")))
                elif parts == ["api", "graph"]:
                    self._send(200, json.dumps(explorer.graph_json(query)), "application/json")
                else:
                    self._send(404, page("not found", f"<p class='err'>no page {_e(url.path)}</p>"))
            except Exception as exc:  # one broken page must not stop the explorer
                self._send(500, page("error", f"<p class='err'>{_e(type(exc).__name__)}: {_e(exc)}</p>"))

    return Handler


def start_explorer(run_root: str | Path, host: str, port: int, auth: str | None = None,
                   extra_hosts: tuple[str, ...] = (), prefect_url: str | None = None) -> ThreadingHTTPServer:
    """Serve the explorer for ``run_root`` on a daemon thread; ``server.shutdown()`` stops it.

    It answers only Host headers in :func:`infra.access.allowed_hosts`; beyond loopback it needs ``auth``
    (the served API's credential, asked for by the browser as HTTP Basic) and refuses to start without.
    """
    check_exposure(host, auth is not None)
    expected = None if is_loopback(host) else auth
    server = ThreadingHTTPServer((host, port), _handler(Explorer(run_root, prefect_url), allowed_hosts(host, extra_hosts),
                                                        expected))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="lineage-explorer", daemon=True).start()
    return server
