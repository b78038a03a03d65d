"""The driver JVM's class-data-sharing archive: built once, then mapped by every driver JVM; a
rejected archive costs one warning line, never a failed session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.spark import build_class_archive, class_archive_path

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import sys
from infra.config import SparkConfig
from infra.spark import get_spark
spark = get_spark(SparkConfig(master="local[1]", conf={"spark.driver.extraJavaOptions": sys.argv[1]}))
args = list(spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
print("ARCHIVE" if any(a.startswith("-XX:SharedArchiveFile=") for a in args) else "NO-ARCHIVE")
print("SUM", spark.range(10).selectExpr("sum(id)").first()[0])
"""


def probe(cache: Path, java_options: str = "") -> subprocess.CompletedProcess:
    """A Spark session in a child process with its class archive in ``cache``; ``-Xshare:on`` makes
    the JVM fail to start unless it maps the archive."""
    env = {**os.environ, "REFINERY_SPARK_ARCHIVE_DIR": str(cache)}
    cmd = [sys.executable, "-c", PROBE, java_options]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_class_archive_is_built_once_and_used(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINERY_SPARK_ARCHIVE_DIR", str(tmp_path))
    archive = class_archive_path()
    if archive is None:
        pytest.skip("no java on this machine")
    assert not archive.exists()
    assert build_class_archive() == archive and archive.stat().st_size > 10 * 2**20
    mtime = archive.stat().st_mtime_ns
    assert build_class_archive() == archive and archive.stat().st_mtime_ns == mtime  # present: not rebuilt
    assert not [p for p in archive.parent.iterdir() if p != archive]  # no temp leftovers

    used = probe(tmp_path, "-Xshare:on")  # starts only if the JVM maps the archive
    assert used.returncode == 0, used.stderr[-2000:]
    assert "ARCHIVE" in used.stdout.split() and "SUM 45" in used.stdout

    archive.chmod(0o644)
    archive.write_bytes(b"not an archive" * 1000)  # stale or broken: Spark still runs
    broken = probe(tmp_path)
    assert broken.returncode == 0 and "SUM 45" in broken.stdout, broken.stderr[-2000:]
    assert probe(tmp_path, "-Xshare:on").returncode != 0  # the check above can fail
