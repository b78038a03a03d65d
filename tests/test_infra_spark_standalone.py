"""The scale-out path: the ingest stage against a real Spark standalone master + worker on 127.0.0.1."""

import socket

import pyarrow.parquet as pq
import pytest

from flows.registry import execute_stage
from infra.spark_standalone import standalone_cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ingest_runs_on_a_standalone_cluster(make_config, tmp_path):
    from pyspark.sql import SparkSession

    assert SparkSession.getActiveSession() is None, "another test left a local session active"
    with standalone_cluster(port=_free_port(), webui_port=_free_port(), cores=2, memory="1g",
                            log_dir=tmp_path / "spark-logs") as master:
        config = make_config({"spark.master": master, "spark.driver_memory": "1g"})
        try:
            m = execute_stage("ingest", config, "cluster-run")
            spark = SparkSession.getActiveSession()
            assert spark.sparkContext.master == master
            executors = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()
            assert executors >= 2  # the driver plus at least one executor on the worker
        finally:
            active = SparkSession.getActiveSession()
            if active is not None:
                active.stop()
    assert m["spark_master"] == master
    assert m["metrics"]["kept"] == 83
    assert pq.read_table(m["outputs"]["data"]["path"]).num_rows == 83
