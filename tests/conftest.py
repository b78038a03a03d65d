"""Shared fixtures: the ../shared/data folder (skip when absent), one Spark session per module, configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("REFINERY_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST_DATA = REPO / "tests" / "data"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"  # the fast profile every test builds on

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests using it skip with a clear reason on a machine without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set REFINERY_SHARED_DATA to run this test)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def spark():
    """One local Spark session per test module (starting one costs ~15 s)."""
    from infra.config import SparkConfig
    from infra.spark import get_spark

    session = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4), app_name="refinery-tests")
    yield session
    session.stop()


@pytest.fixture
def make_config(tmp_path):
    """Build a validated config (configs/tiny.yaml unless ``path``) with ``run_root`` in a temp dir;
    pass overrides as dotted keys."""
    from flows.registry import load_config

    def build(overrides: dict | None = None, path: Path | None = None):
        data = {"run_root": str(tmp_path / "runs"), "spark.master": "local[2]", **(overrides or {})}
        return load_config(path or TINY_CONFIG, overrides=data)

    return build


@pytest.fixture
def fake_registry(monkeypatch):
    """Swap the stage list for the two Spark-free stages in tests/fake_stages.py."""
    import fake_stages

    from flows import registry

    monkeypatch.setattr(registry, "STAGE_MODULES", (fake_stages,))
    registry.all_stages.cache_clear()
    yield
    registry.all_stages.cache_clear()
