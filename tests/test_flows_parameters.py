"""Under `refinery serve`, flow parameters come from an API anyone who reaches its port can call: the
security review's attacks through them (JVM options that run a shell command, another config file,
another run root) are refused with one line; the CLI's user, the config's owner, is not restricted."""

import pytest

from flows.stages import SERVED_POLICY_ENV, check_parameters, resolve_config, served_policy
from infra.config import DEFAULT_CONFIG, ConfigError

PWN = {"spark.conf": {"spark.driver.extraJavaOptions": "-XX:OnOutOfMemoryError=touch /tmp/PWNED"}}


@pytest.fixture
def served(monkeypatch, tmp_path):
    root = tmp_path / "runs"
    monkeypatch.setenv(SERVED_POLICY_ENV, served_policy(str(DEFAULT_CONFIG), str(root),
                                                        {"spark.conf": {"spark.ui.enabled": "false"}}))
    return root


@pytest.mark.parametrize("overrides, message", [
    (PWN, "'spark.driver.extraJavaOptions' cannot be set from a flow parameter"),
    ({"spark": {"conf": {"spark.executor.extraClassPath": "/tmp/evil.jar"}}}, "'spark.executor.extraClassPath'"),
    ({"spark.conf": {"spark.pyspark.python": "/tmp/evil.sh"}}, "'spark.pyspark.python'"),
    ({"spark.conf": {"spark.sql.shuffle.partitionsX": 1}}, "cannot be set from a flow parameter"),
    ({"run_root": "/tmp/elsewhere"}, "writes to its run root"),
    ({"pretrain.torchrun_args": ["--no-python"]}, "pretrain.torchrun_args cannot be set"),
])
def test_served_flow_parameters_that_run_code_or_reach_files_are_refused(served, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config(str(DEFAULT_CONFIG), overrides)
    assert "\n" not in str(info.value)


def test_served_config_file_must_sit_beside_the_served_one_and_its_content_is_never_echoed(served, tmp_path):
    secret = tmp_path / "secrets.yaml"
    secret.write_text("API_TOKEN: [sk-live-0123456789\n")
    with pytest.raises(ConfigError, match="reads its config_file from") as info:
        resolve_config(str(secret), {})
    assert "sk-live" not in str(info.value)
    with pytest.raises(ConfigError, match="reads its config_file from"):
        check_parameters("/etc/passwd", {})
    assert resolve_config(str(DEFAULT_CONFIG.parent / "tiny.yaml"), {}).run_root  # a file beside the served one


def test_served_flow_accepts_sizes_the_served_values_and_its_own_run_root(served):
    config = resolve_config(str(DEFAULT_CONFIG), {
        "spark.conf": {"spark.sql.shuffle.partitions": "3", "spark.ui.enabled": "false"}, "run_root": str(served),
        "heuristics.c4.min_sentences": 3})
    assert config.spark.conf["spark.sql.shuffle.partitions"] == "3" and config.heuristics.c4.min_sentences == 3


def test_the_cli_is_not_restricted(monkeypatch):
    monkeypatch.delenv(SERVED_POLICY_ENV, raising=False)
    config = resolve_config(str(DEFAULT_CONFIG), PWN)
    assert "OnOutOfMemoryError" in config.spark.conf["spark.driver.extraJavaOptions"]


def test_a_served_sweep_refuses_an_axis_that_injects_jvm_options(served):
    from flows.sweep import sweep

    with pytest.raises(ConfigError, match="cannot be set from a flow parameter"):
        sweep.fn(axes={"spark.conf.spark.driver.extraJavaOptions": ["-Xmx1g", "-XX:OnOutOfMemoryError=id"]})
