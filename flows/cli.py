"""refinery — the one command-line entry point.

  refinery run       run the pipeline or chosen stages (rerun a stage on an earlier run with --from)
  refinery demo      run the whole pipeline on the bundled sample and print where everything is
  refinery serve     start a local Prefect server (UI), serve every stage and the pipeline as deployments,
                     and the lineage explorer next to it
  refinery lineage   show where an artifact came from / what was built from it; diff two runs
  refinery sweep     data-ablation sweep: one run per arm, upstream stages reused, one report
  refinery stages    list the stages with their inputs and config keys
  refinery train-quality   train the fastText quality classifier (the train_quality stage)
  refinery report    one HTML report of a run (or two side by side): funnel, curves, eval, lineage
  refinery eval      compare evaluation results of two runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from evaluation.report import compare_runs
from flows.explorer import TraceError, decisions, skip_ledger, start_explorer, trace
from flows.registry import all_stages, execution_metrics, load_config, stage_groups
from infra.access import CREDENTIAL_ENV, CREDENTIAL_FILE, AccessError, check_exposure, credential, is_loopback
from infra.config import DEFAULT_CONFIG, ConfigError, parse_override
from infra.effects import EFFECTS_TABLE, format_effect
from infra.executor import StageInputError, parse_from
from infra.lineage import LineageCatalog, diff_runs, label
from infra.prefect_server import configure_prefect_env, prefect_server
from infra.runstore import RunStoreError

# Modules that import Prefect (flows.pipeline, .stages, .serve, .sweep) are imported inside the commands,
# after configure_prefect_env() has set Prefect's environment defaults (PREFECT_HOME, analytics off).


def _overrides_dict(items: list[str]) -> dict:
    return {".".join(path): value for path, value in (parse_override(o) for o in items)}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=str(DEFAULT_CONFIG), help="config YAML (default: %(default)s)")
    p.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. -o heuristics.c4.min_sentences=3 (repeatable; value parsed as YAML)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    configure_prefect_env()
    overrides = _overrides_dict(args.override)
    config = load_config(args.config, overrides)  # fail fast with one clear line
    stages = [s for s in (args.stages or "").split(",") if s] or None
    if stages:
        unknown = [s for s in stages if s not in all_stages() and s not in stage_groups()]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; known: {', '.join(stage_groups())} (groups), "
                              f"{', '.join(all_stages())}")
    if args.from_ref:
        run, _ = parse_from(args.from_ref)
        if not (Path(config.run_root) / run).is_dir():
            print(f"error: --from {args.from_ref!r}: run {run!r} does not exist under {config.run_root}", file=sys.stderr)
            return 2
    from flows.pipeline import validated_pipeline

    result = validated_pipeline(
        config=config, stages=stages or [], run_id=args.run_id or "", from_run=args.from_ref or "", force=args.force,
    )
    print(f"run {result['run_id']} under {result['run_root']}:")
    for stage, info in result["stages"].items():
        print(f"  {stage:<16} {info['status']:<10} {info['dir']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    configure_prefect_env()
    overrides = _overrides_dict(args.override)
    config = load_config(args.config, overrides)
    from flows.pipeline import eval_rows, validated_pipeline

    result = validated_pipeline(config=config, run_id=args.run_id or "")
    run_root = Path(config.run_root).resolve()
    run_dir = run_root / result["run_id"]
    catalog = LineageCatalog(run_root)
    stage_runs = catalog.stage_runs(result["run_id"])
    manifests = {r["stage"]: json.loads(Path(r["manifest_path"]).read_text()) for r in stage_runs}
    print("\n=== Refinery demo finished ===")
    print(f"outputs:  {run_dir}")
    total = 0.0
    for stage, info in result["stages"].items():
        seconds = manifests.get(stage, {}).get("timings", {}).get("seconds", 0.0) if info["status"] == "completed" else 0.0
        total += seconds
        print(f"  {stage:<16} {info['status']:<10} {seconds:>7.1f} s  {info['dir']}")
    print(f"  {'total':<16} {'':<10} {total:>7.1f} s  (stage wall times; reused stages count 0)")
    print(f"lineage catalog: {catalog.path}")
    for r in stage_runs:
        outs = ", ".join(f"{k} [{v['hash'].split(':')[-1][:10]}]" for k, v in r["outputs"].items())
        ins = ", ".join(sorted({v.get("stage") or name for name, v in r["inputs"].items()}))
        print(f"  {r['stage']:<16} <- {ins or '-'}  -> {outs}")
    funnel = [r for r in stage_runs if "kept" in r["metrics"]]
    if funnel:
        print("funnel (documents kept per stage):")
        for r in funnel:
            print(f"  {r['stage']:<16} {r['metrics']['rows_in']:>7} in  {r['metrics']['kept']:>7} kept")
    evals = eval_rows([r for r in stage_runs if r["stage"].startswith("eval_")])
    if evals:
        print("evaluation (one row per trained checkpoint):")
        for row in [list(evals[0]), *(row.values() for row in evals)]:
            print("  " + " | ".join(map(str, row)))
    effects = [row for m in manifests.values() for row in (m.get("tables") or {}).get(EFFECTS_TABLE, [])]
    if effects:
        print("training effects on held-out data (before → after, 95% intervals; Δ interval is paired):")
        for row in effects:
            print(f"  {row['stage']:<8} {format_effect(row)}")
    for stage, m in manifests.items():
        for warning in m.get("warnings", []):
            print(f"WARNING {stage}: {warning}")
    print(f"report:   {run_dir / 'report.html'}")
    print(f"UI: run `refinery serve` and open http://{config.prefect.host}:{config.prefect.port} "
          f"(flow runs, logs, artifacts; PREFECT_HOME={os.environ['PREFECT_HOME']})")
    print(f"lineage: refinery lineage show {result['run_id']}  |  refinery lineage diff RUN_A RUN_B")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    configure_prefect_env()
    overrides = _overrides_dict(args.override)
    config = load_config(args.config, overrides)
    host, port = args.host or config.prefect.host, args.port or config.prefect.port
    explorer_port = config.prefect.explorer_port if args.explorer_port is None else args.explorer_port
    extra_hosts = tuple(args.allowed_host or ())
    try:
        check_exposure(host, not args.no_auth)
        auth, created = (None, False) if args.no_auth else credential(os.environ["PREFECT_HOME"])
    except AccessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # on SIGTERM, unwind normally so the Prefect server this command started is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with prefect_server(host, port, on_error=lambda line: print(line, file=sys.stderr, flush=True),
                        auth=auth, extra_hosts=extra_hosts) as api_url:
        from prefect import serve

        from flows.serve import build_deployments
        from flows.stages import EXPLORER_URL_ENV, SERVED_POLICY_ENV, served_policy

        # the deployments' parameters come from the UI/API: the flows check them against what is served
        os.environ[SERVED_POLICY_ENV] = served_policy(args.config, config.run_root, overrides)

        explorer = None
        if explorer_port:
            explorer = start_explorer(Path(config.run_root).resolve(), host, explorer_port, auth, extra_hosts,
                                      prefect_url=f"http://{host}:{port}")
            os.environ[EXPLORER_URL_ENV] = f"http://{host}:{explorer.server_address[1]}"
        deployments = build_deployments(args.config, config, overrides)
        print(f"Prefect UI: http://{host}:{port}  (API {api_url}); serving {len(deployments)} deployments "
              f"(run root {Path(config.run_root).resolve()}).")
        if created:
            print(f"Log in with this password (shown once; kept in {Path(os.environ['PREFECT_HOME']) / CREDENTIAL_FILE}, "
                  f"mode 0600): {auth}")
        elif auth:
            print(f"Log in with the password in {Path(os.environ['PREFECT_HOME']) / CREDENTIAL_FILE} "
                  f"(or ${CREDENTIAL_ENV}); workers and the CLI on this PREFECT_HOME send it themselves.")
        if explorer:
            print(f"Lineage explorer: {os.environ[EXPLORER_URL_ENV]}")
        print("Errors of Prefect's server services (scheduler, ...) are shown here; Ctrl-C stops.", flush=True)
        try:
            if not args.check:
                serve(*deployments, print_starting_message=False, limit=args.limit)
        finally:
            if explorer:
                explorer.shutdown()
    return 0


def cmd_lineage_ui(args: argparse.Namespace) -> int:
    configure_prefect_env()
    config = load_config(args.config, _overrides_dict(args.override))
    host = args.host or config.prefect.host
    try:
        auth = None if is_loopback(host) else credential(os.environ["PREFECT_HOME"])[0]
        server = start_explorer(Path(config.run_root).resolve(), host, args.port, auth)
    except AccessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Lineage explorer: http://{server.server_address[0]}:{server.server_address[1]}  "
          f"(run root {Path(config.run_root).resolve()}); Ctrl-C stops.", flush=True)
    if auth:
        print(f"Log in with the password in {Path(os.environ['PREFECT_HOME']) / CREDENTIAL_FILE} (or ${CREDENTIAL_ENV}).")
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()


def cmd_sweep(args: argparse.Namespace) -> int:
    configure_prefect_env()
    overrides = _overrides_dict(args.override)
    config = load_config(args.config, overrides)
    from flows.sweep import Axis, parse_axis, plan_sweep, sweep

    spec = config.sweep
    axes = [parse_axis(a) for a in args.axis] or [Axis(k, tuple(v)) for k, v in spec.axes.items()]
    mode, seeds = args.mode or spec.mode, args.seeds or spec.seeds
    stages = [s for s in (args.stages or "").split(",") if s] or spec.stages
    parallel = args.parallel or spec.parallel
    plan = plan_sweep(args.config, overrides, axes, mode, seeds, stages or None, args.name)  # fail fast
    print(f"sweep {plan.sweep_id}: {len(plan.arms)} arm runs, stages {', '.join(plan.stages)}; "
          f"first changed stage: {plan.first_varying_stage}", flush=True)
    if args.dry_run:
        for arm in plan.arms:
            print(f"  {arm.run_id}  {arm.overrides}")
        return 0
    summary = sweep(axes={a.key: list(a.values) for a in axes}, mode=mode, seeds=seeds, stages=plan.stages,
                    parallel=parallel, config_file=args.config, overrides=overrides, name=plan.sweep_id)
    ex = summary["stage_executions"]
    print(f"\nsweep {summary['sweep_id']}: stage executions {ex['computed']} computed, {ex['reused']} reused from "
          f"the cache, {ex['skipped']} already done")
    for arm in summary["arms"]:
        print(f"  {arm['run_id']:<28} {arm['status']:<10} {arm['values']} seed={arm['seed']}"
              + (f"  {arm['error']}" if arm["error"] else ""))
    for line in summary["lines"]:
        print("  " + line)
    print(f"report: {summary['report']}")
    return 0 if all(a["status"] == "completed" for a in summary["arms"]) else 1


def cmd_stages(args: argparse.Namespace) -> int:
    for name, stage in all_stages().items():
        inputs = ", ".join([*stage.inputs, *(f"{s}?" for s in stage.optional_inputs)]) or "external files"
        print(f"{name:<16} {stage.description}\n{'':<16} inputs: {inputs}")
        if args.verbose:
            for field, info in stage.config_model.model_fields.items():
                default = info.get_default(call_default_factory=True)
                print(f"{'':<18}{name}.{field} = {default!r}  {info.description or ''}")
    return 0


def print_skip_ledger(catalog: LineageCatalog, run: dict) -> None:
    """A pretrain run's rolled-back spikes and the documents of their skipped samples, with the curation
    decisions that let each document in."""
    for e in skip_ledger(catalog, run):
        print(f"   spike at step {e['step']} ({e['reason']}): rolled back to step {e['rolled_back_to']}, "
              f"{e['num_skipped']} samples skipped; their documents:")
        for d in e["documents"]:
            shown = ", ".join(f"{k}={v}" for k, v in decisions(d["curation"]).items() if k != "from") or "not a web page"
            print(f"     {d.get('doc_id') or d['shard'] + '#' + str(d['seq'])}  {d.get('url') or ''}  "
                  f"WARC {d.get('source') or '?'}  [{shown}]")


def cmd_lineage_show(args: argparse.Namespace) -> int:
    catalog = LineageCatalog(Path(load_config(args.config, _overrides_dict(args.override)).run_root).resolve())
    ref = args.ref
    if "/" not in ref and ref in catalog.runs():
        for r in catalog.stage_runs(ref):
            cached = f" (reused {r['cached_from']})" if r["cached_from"] else ""
            print(f"{ref}/{r['stage']}{cached}")
            for name, inp in r["inputs"].items():
                src = f"{inp['run_id']}/{inp['stage']}/{inp['output']}" if inp.get("stage") else inp["uri"]
                print(f"   <- {name}: {src}  [{inp['hash'].split(':')[-1][:12]}]")
            for name, out in r["outputs"].items():
                print(f"   -> {name}: {out['path']}  [{out['hash'].split(':')[-1][:12]}]")
            print_skip_ledger(catalog, r)
        return 0
    matches = catalog.resolve(ref)
    if not matches:
        print(f"error: no artifact or run matches {ref!r} (try RUN_ID, RUN/STAGE[/OUTPUT], a path or a hash prefix)",
              file=sys.stderr)
        return 2
    for art in matches:
        print(label(art))
        if art["kind"] == "stage_output":
            print_skip_ledger(catalog, catalog.stage_run(art["run_id"], art["stage"]))
        print("  upstream (where it came from):")
        for level, a in catalog.tree(art["uri"], "up") or [(1, None)]:
            print("    " + "  " * level + (f"<- {label(a)}  via {a['via_stage']}" if a else "(none)"))
        print("  downstream (what was built from it):")
        for level, a in catalog.tree(art["uri"], "down") or [(1, None)]:
            print("    " + "  " * level + (f"-> {label(a)}" if a else "(none)"))
    return 0


def cmd_lineage_trace(args: argparse.Namespace) -> int:
    """A token sequence of a shard → its document → the WARC record it was extracted from."""
    run_root = Path(load_config(args.config, _overrides_dict(args.override)).run_root).resolve()
    catalog = LineageCatalog(run_root)
    try:
        shards, doc = trace(catalog, run_root, args.shards, args.shard, args.seq_index)
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.shard}[{args.seq_index}]: {doc['tokens']} tokens")
    print(f"  doc_id  {doc['doc_id']}\n  url     {doc['url']}\n  source  {doc['source']}")
    warc_file, _, offset = (doc["source"] or "").rpartition("@")
    if warc_file and offset.isdigit():
        print(f"  WARC record at byte {offset} of {warc_file}")
    print("  built from:")
    for level, a in catalog.tree(shards["uri"], "up"):
        print("    " + "  " * level + f"<- {label(a)}")
    return 0


def cmd_train_quality(args: argparse.Namespace) -> int:
    args.stages, args.force = "train_quality", getattr(args, "force", False)
    return cmd_run(args)


def cmd_lineage_diff(args: argparse.Namespace) -> int:
    catalog = LineageCatalog(Path(load_config(args.config, _overrides_dict(args.override)).run_root).resolve())
    try:
        lines = diff_runs(catalog, args.run_a, args.run_b, execution_metrics())
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def cmd_lineage_runs(args: argparse.Namespace) -> int:
    catalog = LineageCatalog(Path(load_config(args.config, _overrides_dict(args.override)).run_root).resolve())
    for run in catalog.runs():
        stages = catalog.stage_runs(run)
        print(f"{run}  {', '.join(s['stage'] + ('*' if s['cached_from'] else '') for s in stages)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.report import write_report

    config = load_config(args.config, _overrides_dict(args.override))
    try:
        path = write_report(config.run_root, args.run_a, args.run_b)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    """``refinery eval compare RUN_A RUN_B``: the eval stages both runs completed, same tasks side by side."""
    run_root = args.run_root or load_config(args.config).run_root
    try:
        rows, markdown = compare_runs(run_root, args.run_a, args.run_b)
    except RunStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else markdown)
    return 0 if rows else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the pipeline or chosen stages through Prefect",
                       description="Run stages in pipeline order. Unchanged stages (same input hashes and config) "
                                   "are skipped or reuse an earlier run's outputs.")
    _add_config_args(p)
    p.add_argument("--stages", help="comma-separated stages or groups to run: curation (archives to token shards), "
                                    "training (pretraining to RL, with evaluations), all (default: the config's pipeline)")
    p.add_argument("--from", dest="from_ref", metavar="RUN[/STAGE]",
                   help="use this earlier run's outputs as inputs (RUN/STAGE feeds the first selected stage)")
    p.add_argument("--run-id", help="write into this run id (default: a new one)")
    p.add_argument("--force", action="store_true", help="rerun even if the cache says the stage is unchanged")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the whole pipeline on the bundled sample and print where everything is")
    _add_config_args(p)
    p.add_argument("--run-id", help="run id (default: a new one)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="start the Prefect UI/server and serve every stage and the pipeline as deployments",
                       description="Start a local Prefect server (or use PREFECT_API_URL), serve `refinery-pipeline` and "
                                   "one `stage-STAGE` deployment per stage, and the lineage explorer. -o overrides "
                                   "apply to every run started from the UI (they prefill each deployment's parameters).")
    _add_config_args(p)
    p.add_argument("--host", help="bind address (default: prefect.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: prefect.port, 4200)")
    p.add_argument("--explorer-port", type=int,
                   help="port of the lineage explorer served next to the UI (default: prefect.explorer_port, 4201; 0 = off)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="flow runs this worker runs at once (default: no limit). A second `refinery serve` with "
                        "PREFECT_API_URL set to the first one's server is a second worker for the same deployments")
    p.add_argument("--check", action="store_true", help="start the server, build the deployments, and exit")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="another name the UI is reached by (Host header), e.g. behind a reverse proxy; repeatable")
    p.add_argument("--no-auth", action="store_true",
                   help="serve the API without the password (loopback hosts only). By default the API needs HTTP "
                        "Basic auth: the password is generated on first start into PREFECT_HOME/refinery-api-auth "
                        "(or taken from $PREFECT_API_AUTH_STRING)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("lineage", help="inspect data and checkpoint lineage across runs")
    lsub = p.add_subparsers(dest="lineage_command", metavar="ACTION", required=True)
    q = lsub.add_parser("show", help="upstream and downstream trees of an artifact (RUN/STAGE[/OUTPUT], path, hash) or a run")
    _add_config_args(q)
    q.add_argument("ref")
    q.set_defaults(func=cmd_lineage_show)
    q = lsub.add_parser("diff", help="what differs between two runs, by content: stages with equal output hashes are "
                                            "the same (reuse shown, not counted); config keys, input and output "
                                            "hashes, metrics of the stages that differ")
    _add_config_args(q)
    q.add_argument("run_a")
    q.add_argument("run_b")
    q.set_defaults(func=cmd_lineage_diff)
    q = lsub.add_parser("trace", help="a token sequence of a shard → its document → its WARC record")
    _add_config_args(q)
    q.add_argument("shards", help="the shards artifact, e.g. RUN/tokenize/shards")
    q.add_argument("shard", help="shard name (file name without .bin/.idx)")
    q.add_argument("seq_index", type=int, help="sequence (document) index within the shard")
    q.set_defaults(func=cmd_lineage_trace)
    q = lsub.add_parser("ui", help="serve the lineage explorer (graph across runs, diffs, token trace) in a browser",
                        description="The same explorer `refinery serve` starts next to the Prefect UI, on its own.")
    _add_config_args(q)
    q.add_argument("--host", help="bind address (default: prefect.host, 127.0.0.1)")
    q.add_argument("--port", type=int, default=4201, help="port (default: %(default)s)")
    q.set_defaults(func=cmd_lineage_ui)
    q = lsub.add_parser("runs", help="list runs in the catalog (* = stage reused from cache)")
    _add_config_args(q)
    q.set_defaults(func=cmd_lineage_runs)

    p = sub.add_parser("train-quality", help="train the fastText quality classifier (runs the train_quality stage)",
                       description="Train the supervised fastText quality model from positives/negatives in the "
                                   "train_quality config section; it is versioned in the lineage catalog.")
    _add_config_args(p)
    p.add_argument("--from", dest="from_ref", metavar="RUN[/STAGE]", help="run whose heuristics rejects are negatives")
    p.add_argument("--run-id", help="write into this run id (default: a new one)")
    p.add_argument("--force", action="store_true", help="retrain even if inputs and config are unchanged")
    p.set_defaults(func=cmd_train_quality)

    p = sub.add_parser(
        "sweep", help="data-ablation sweep: one run per arm (axis values × seeds), compared in one report",
        description="Change curation knobs, retrain a proxy model per arm under a fixed token budget with one "
                    "tokenizer, evaluate, and compare. Each arm is an ordinary run; stages upstream of the changed "
                    "keys are reused from the cache; rerunning the same command finishes only what is missing.",
        epilog="example: refinery sweep -a heuristics.gopher_quality.min_doc_words=[50,100,200] --seeds 2 "
               "--stages ingest,extract,langid,heuristics,train_quality,quality,dedup,tokenizer,tokenize,pretrain,eval_pretrain")
    _add_config_args(p)
    p.add_argument("-a", "--axis", action="append", default=[], metavar="KEY=[V1,V2]",
                   help="a config key and its values (YAML list), repeatable (default: the config's sweep.axes)")
    p.add_argument("--mode", choices=["grid", "zip"], help="grid: every combination (default); zip: i-th values together")
    p.add_argument("--seeds", type=int, help="pretraining seeds per arm (default: sweep.seeds, 1)")
    p.add_argument("--stages", help="comma-separated stages each arm runs (default: sweep.stages, else curation + "
                   "pretrain + eval_pretrain, never SFT/RL)")
    p.add_argument("--parallel", type=int, help="arms running at the same time (default: sweep.parallel, 1)")
    p.add_argument("--name", help="sweep id (default: derived from config, overrides, axis keys and stages)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the arms, run nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("stages", help="list stages, their inputs, and (with -v) their config keys")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("report", help="one HTML report of a run (funnel, curves, eval with intervals, lineage), "
                                      "or two runs side by side")
    _add_config_args(p)
    p.add_argument("run_a", metavar="RUN")
    p.add_argument("run_b", metavar="RUN_B", nargs="?", help="a second run to show side by side")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="evaluation results: compare two runs' eval stages")
    esub = p.add_subparsers(dest="eval_command", required=True)
    q = esub.add_parser("compare", help="same tasks side by side with deltas (reads the runs' eval manifests)")
    q.add_argument("run_a")
    q.add_argument("run_b")
    q.add_argument("-c", "--config", default=str(DEFAULT_CONFIG), help="config whose run_root holds the runs")
    q.add_argument("--run-root", help="run root (overrides the config's)")
    q.add_argument("--json", action="store_true", help="print rows as JSON instead of markdown")
    q.set_defaults(func=cmd_eval_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from flows.stages import StageFailed  # imports Prefect; only reached when a command failed

        if isinstance(exc, (StageInputError, RunStoreError, StageFailed)):
            print(f"error: {getattr(exc, 'reason', exc)}", file=sys.stderr)  # the log above has the details
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
