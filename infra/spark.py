"""SparkSession factory: ``local[*]`` by default, any master URL from the config's ``spark`` section.

Every stage starts its own driver JVM, so JVM start-up is paid per stage. ``make install`` runs
``python -m infra.spark --build-class-archive``: a small representative Spark workload whose driver
JVM dumps the classes it loaded into a class-data-sharing archive (``-XX:ArchiveClassesAtExit``),
which later driver JVMs map instead of loading and verifying those classes again (measured: session
start 3.7 → 2.3 s, first job 1.6 → 0.8 s). The archive lives in the venv, keyed by the Java binary
and the pyspark version; without it (or when the JVM rejects it) Spark runs as usual.
"""

from __future__ import annotations

import argparse
import hashlib
from importlib.metadata import version
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra.config import SparkConfig

EXIT_ON_OOM = "-XX:+ExitOnOutOfMemoryError"
C1_JIT = "-XX:TieredStopAtLevel=1"
# options that change the driver's class path, which a class archive must match
_CLASS_PATH_CONF = ("spark.driver.extraClassPath", "spark.jars", "spark.jars.packages")


def class_archive_path() -> Path | None:
    """Where the class archive for this Java + pyspark lives (None: no ``java`` found): inside the
    virtual environment (``REFINERY_SPARK_ARCHIVE_DIR`` to move it), so it goes when the venv goes."""
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not Path(java).exists():
        return None
    java = Path(java).resolve()
    key = f"{java}|{java.stat().st_mtime_ns}|{version('pyspark')}"
    folder = Path(os.environ.get("REFINERY_SPARK_ARCHIVE_DIR") or Path(sys.prefix) / "var" / "refinery")
    return folder / f"spark-classes-{hashlib.sha1(key.encode()).hexdigest()[:16]}.jsa"


def get_spark(cfg, app_name: str = "refinery"):
    """Build (or return the active) SparkSession for ``cfg`` (an ``infra.config.SparkConfig``).

    Python workers use this interpreter, so a cluster's executors must have the project installed
    at the same path (true for local mode and the standalone test; use a shared venv or an image
    on a real cluster).
    """
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if cfg.driver_host:
        os.environ.setdefault("SPARK_LOCAL_IP", cfg.driver_host)
    builder = (
        SparkSession.builder.master(cfg.master)
        .appName(app_name)
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.parquet.compression.codec", "zstd")
        # a partitioned write (kept/rejected) through open writers, not after sorting the task's rows: the
        # sort held whole rows (raw HTML in ingest: peak RSS 4.9 GB vs 3.4 GB for one 8,000-record WARC)
        .config("spark.sql.maxConcurrentOutputFileWriters", "4")
    )
    if cfg.driver_host:
        builder = builder.config("spark.driver.host", cfg.driver_host).config("spark.driver.bindAddress", cfg.driver_host)
    conf = dict(cfg.conf)
    # a JVM out of memory exits (the stage fails with that reason) instead of living on half-broken
    ours = [EXIT_ON_OOM]
    if cfg.local_c1_jit and cfg.master.startswith("local"):
        ours.append(C1_JIT)
    archive = class_archive_path()
    if archive and archive.exists() and not any(k in conf for k in _CLASS_PATH_CONF):
        ours.append(f"-XX:SharedArchiveFile={archive}")
    # the user's own options come last, so theirs win (HotSpot takes the last of a repeated flag)
    java_options = " ".join([*ours, conf.get("spark.driver.extraJavaOptions", "")]).strip()
    conf["spark.driver.extraJavaOptions"] = java_options
    conf["spark.executor.extraJavaOptions"] = " ".join([EXIT_ON_OOM, conf.get("spark.executor.extraJavaOptions", "")]).strip()
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _archive_workload(out_dir: Path) -> None:
    """What a stage's driver does, in small (Parquet out and in, an Arrow Python UDF, a window, a
    join, a collect_set aggregation, a local checkpoint), in a driver JVM that dumps the classes it
    loaded to ``out_dir/classes.jsa`` as it exits."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    dump = {"spark.driver.extraJavaOptions": f"-XX:ArchiveClassesAtExit={out_dir / 'classes.jsa'} -Xlog:cds*=off"}
    spark = get_spark(SparkConfig(master="local[1]", conf=dump), app_name="refinery-class-archive")
    (out_dir / "jvm.pid").write_text(str(spark.sparkContext._jvm.ProcessHandle.current().pid()))
    rows = [(f"d{i:03d}", f"word{i % 7} text {i % 3}") for i in range(200)]
    spark.createDataFrame(rows, "doc_id string, text string").write.parquet(str(out_dir / "in"))
    df = spark.read.parquet(str(out_dir / "in"))

    def lengths(batches):
        for b in batches:
            yield pa.RecordBatch.from_arrays([b.column("doc_id"), pc.utf8_length(b.column("text"))], names=["doc_id", "n"])

    n = df.mapInArrow(lengths, "doc_id string, n int").localCheckpoint()
    ranked = df.join(n, "doc_id").withColumn("first", F.min("doc_id").over(Window.partitionBy("text")))
    ranked.groupBy("first").agg(F.collect_set("doc_id").alias("ids")).select("first", F.explode("ids")).count()
    ranked.write.parquet(str(out_dir / "out"))
    spark.stop()


def build_class_archive(timeout_s: float = 300) -> Path | None:
    """Build this machine's class archive (no-op when present); returns its path (None: no java)."""
    archive = class_archive_path()
    if archive is None or archive.exists():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent) as tmp:
        partial, pid_file = Path(tmp) / "classes.jsa", Path(tmp) / "jvm.pid"
        subprocess.run([sys.executable, "-m", "infra.spark", "--archive-workload", tmp], check=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while _running(int(pid_file.read_text())):  # the JVM writes the archive as it exits, after its Python parent
            if time.monotonic() > deadline:
                raise TimeoutError(f"the driver JVM was still writing its class archive after {timeout_s:.0f} s")
            time.sleep(0.2)
        if not partial.exists():
            raise FileNotFoundError(f"the driver JVM exited without writing a class archive ({partial})")
        os.replace(partial, archive)
    return archive


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description="Spark helpers: build the driver JVM's class-data-sharing archive.")
    ap.add_argument("--build-class-archive", action="store_true", help="build it unless present (make install runs this)")
    ap.add_argument("--archive-workload", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.archive_workload:
        _archive_workload(Path(args.archive_workload))
    elif args.build_class_archive:
        t0 = time.perf_counter()
        try:
            path = build_class_archive()
        except (OSError, subprocess.SubprocessError) as exc:  # an optimisation: Spark works without it
            print(f"warning: no Spark class archive built ({exc}); Spark JVMs will start without one", file=sys.stderr)
            return
        print(f"Spark class archive: {path or 'skipped (no java found)'} ({time.perf_counter() - t0:.0f} s)")
    else:
        ap.print_help()


if __name__ == "__main__":
    main()
