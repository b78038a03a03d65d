"""``refinery eval compare RUN_A RUN_B``: the eval stages both runs completed, same tasks side by side with deltas."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_compare(args: argparse.Namespace) -> int:
    from evaluation.report import compare_runs
    from infra.config import load_config
    from infra.runstore import RunStoreError

    run_root = args.run_root or load_config(args.config).run_root
    try:
        rows, markdown = compare_runs(run_root, args.run_a, args.run_b)
    except RunStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else markdown)
    return 0 if rows else 1


def register(subparsers) -> None:
    """Add ``eval`` (with ``compare``) to the ``refinery`` command."""
    from infra.config import DEFAULT_CONFIG

    p = subparsers.add_parser("eval", help="evaluation results: compare two runs' eval stages")
    sub = p.add_subparsers(dest="eval_command", required=True)
    q = sub.add_parser("compare", help="same tasks side by side with deltas (reads the runs' eval manifests)")
    q.add_argument("run_a")
    q.add_argument("run_b")
    q.add_argument("-c", "--config", default=str(DEFAULT_CONFIG), help="config whose run_root holds the runs")
    q.add_argument("--run-root", help="run root (overrides the config's)")
    q.add_argument("--json", action="store_true", help="print rows as JSON instead of markdown")
    q.set_defaults(func=cmd_compare)
