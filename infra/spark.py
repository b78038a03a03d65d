"""SparkSession factory: ``local[*]`` by default, any master URL from the config's ``spark`` section."""

from __future__ import annotations

import os
import sys

C1_JIT = "-XX:TieredStopAtLevel=1"


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
    )
    if cfg.driver_host:
        builder = builder.config("spark.driver.host", cfg.driver_host).config("spark.driver.bindAddress", cfg.driver_host)
    conf = dict(cfg.conf)
    if cfg.local_c1_jit and cfg.master.startswith("local"):
        # the user's own options come last, so theirs win (HotSpot takes the last of a repeated flag)
        user_opts = conf.get("spark.driver.extraJavaOptions", "")
        conf["spark.driver.extraJavaOptions"] = f"{C1_JIT} {user_opts}".strip()
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
