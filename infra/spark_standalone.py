"""Start a Spark standalone master + worker on this host (what the pip pyspark lacks start-master.sh for).

Used by the scale-out test and by `python -m infra.spark_standalone` to try the cluster path locally:
stages then run with ``-o spark.master=spark://127.0.0.1:7077``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"Spark {what} exited with code {proc.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"Spark {what} did not listen on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def standalone_cluster(
    host: str = "127.0.0.1", port: int = 7077, webui_port: int = 8080, cores: int = 2, memory: str = "2g",
    log_dir: Path | None = None,
) -> Iterator[str]:
    """A master and one worker for the duration of the block; yields the master URL."""
    spark_class = str(spark_home() / "bin" / "spark-class")
    env = {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": host}
    log_dir = Path(log_dir or Path.cwd() / ".spark-standalone")
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        with open(log_dir / "master.log", "ab") as log:
            master = subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.master.Master", "--host", host, "--port", str(port),
                 "--webui-port", str(webui_port)], stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(master)
        _wait_port(host, port, 120, master, "master")
        url = f"spark://{host}:{port}"
        with open(log_dir / "worker.log", "ab") as log:
            worker = subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host", host,
                 "--cores", str(cores), "--memory", memory, "--webui-port", "0"],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(worker)
        time.sleep(2)
        if worker.poll() is not None:
            raise RuntimeError(f"Spark worker exited with code {worker.returncode}; see {log_dir / 'worker.log'}")
        yield url
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    with standalone_cluster() as master_url:
        print(f"Spark standalone master at {master_url} (web UI http://127.0.0.1:8080). Ctrl-C stops.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
