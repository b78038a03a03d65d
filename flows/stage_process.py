"""The process one stage runs in: ``python -m flows.stage_process --stage S --run-id R --config-json F``.

The Prefect stage task launches it and streams its output into the run logs; the config it reads is
the one validated where the run started (CLI or UI parameters), written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flows.registry import execute_stage, validate_config
from infra.config import ConfigError
from infra.executor import RESULT_MARKER, StageInputError, StageStorageError
from infra.process import stop_own_group_on_sigterm
from infra.runstore import RunStoreError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one Refinery stage (launched by the Prefect stage task).")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--config-json", required=True, help="resolved config as a JSON file")
    parser.add_argument("--from", dest="from_ref")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    stop_own_group_on_sigterm()  # a killed parent or a cancelled run stops Spark/torchrun too, temp dirs removed
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        config = validate_config(json.loads(Path(args.config_json).read_text()))
        manifest = execute_stage(args.stage, config, args.run_id, args.from_ref, args.force)
    except (ConfigError, StageInputError, RunStoreError, StageStorageError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    result = {"manifest": manifest["manifest_path"], "skipped": bool(manifest.get("skipped"))}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
