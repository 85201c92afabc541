import json

import pytest
from click.testing import CliRunner

from kernorm.cli import main
from kernorm.distribution import StrategyPlan, choose_strategy, parse_tf_config
from kernorm.errors import KernormError

TWO_WORKERS = {"worker": ["127.0.0.1:2001", "127.0.0.1:2002"]}


def tf_config(cluster=TWO_WORKERS, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize("gpus, expected", [
    ([], StrategyPlan("default")),
    (["GPU:0"], StrategyPlan("one-device", ("GPU:0",))),
    (["GPU:0", "GPU:1"], StrategyPlan("mirrored", ("GPU:0", "GPU:1"))),
    (["/physical_device:GPU:0", "/physical_device:GPU:1", "/physical_device:GPU:2"],
     StrategyPlan("mirrored", ("GPU:0", "GPU:1", "GPU:2"))),
])
def test_auto_uses_every_gpu_or_the_cpu(gpus, expected):
    gpus = [g.split("physical_device:")[-1] for g in gpus]
    assert choose_strategy("auto", gpus) == expected


@pytest.mark.parametrize("strategy, devices, expected", [
    ("auto", ["gpu:2"], StrategyPlan("one-device", ("GPU:2",))),
    ("auto", ["/device:GPU:3", "/gpu:1"], StrategyPlan("mirrored", ("GPU:3", "GPU:1"))),
    ("mirrored", ["GPU:1"], StrategyPlan("mirrored", ("GPU:1",))),
    ("auto", ["CPU:0"], StrategyPlan("one-device", ("CPU:0",))),
])
def test_devices_pick_devices_explicitly(strategy, devices, expected):
    assert choose_strategy(strategy, ["GPU:0", "GPU:1", "GPU:2", "GPU:3"], devices=devices) == expected


def test_mirrored_uses_all_gpus_or_cpu_replicas():
    assert choose_strategy("mirrored", ["GPU:0", "GPU:1"]) == StrategyPlan("mirrored", ("GPU:0", "GPU:1"))
    assert choose_strategy("mirrored", [], cpu_replicas=3) == StrategyPlan("mirrored", ("CPU:0", "CPU:1", "CPU:2"), 3)
    # Asked for explicitly, CPU replicas win over GPUs; --devices picks among them.
    assert choose_strategy("mirrored", ["GPU:0"], cpu_replicas=2).devices == ("CPU:0", "CPU:1")
    assert choose_strategy("mirrored", [], devices=["CPU:1", "CPU:3"], cpu_replicas=4) == StrategyPlan(
        "mirrored", ("CPU:1", "CPU:3"), 4)


def test_default_ignores_gpus():
    assert choose_strategy("default", ["GPU:0", "GPU:1"]) == StrategyPlan("default")


@pytest.mark.parametrize("cluster, task_type, index, chief", [
    (TWO_WORKERS, "worker", 0, True),
    (TWO_WORKERS, "worker", 1, False),
    ({"chief": ["h:1"], "worker": ["h:2"]}, "chief", 0, True),
    ({"chief": ["h:1"], "worker": ["h:2"]}, "worker", 0, False),
])
def test_multi_worker_reads_tf_config_and_finds_the_chief(cluster, task_type, index, chief):
    plan = choose_strategy("multi-worker", ["GPU:0"], tf_config=tf_config(cluster, task_type, index))
    assert plan == StrategyPlan("multi-worker", task=(task_type, index), chief=chief)


@pytest.mark.parametrize("text, message", [
    (None, "needs the TF_CONFIG environment variable"),
    ("", "needs the TF_CONFIG environment variable"),
    ("{not json", "TF_CONFIG is not a cluster and task description"),
    (json.dumps({"cluster": TWO_WORKERS}), "TF_CONFIG is not a cluster and task description"),
    (tf_config(index=2), "task index 2 is out of range: the cluster has 2 worker task(s)"),
    (tf_config(task_type="chief"), "task type 'chief' is not in its cluster"),
    (tf_config(cluster={"ps": ["h:1"], "worker": ["h:2"]}), "cluster has 'ps' tasks"),
    (tf_config(cluster={"worker": ["localhost"]}), "must be a list of \"host:port\" addresses"),
    (tf_config(cluster={"worker": "h:1"}), "must be a list of \"host:port\" addresses"),
])
def test_bad_tf_config(text, message):
    with pytest.raises(KernormError) as error:
        parse_tf_config(text)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="mirrored", gpus=[]), "found no GPU; pass --cpu-replicas N"),
    (dict(name="default", gpus=[], cpu_replicas=2), "--cpu-replicas works with --strategy mirrored only"),
    (dict(name="auto", gpus=[], cpu_replicas=2), "--cpu-replicas works with --strategy mirrored only"),
    (dict(name="default", gpus=["GPU:0"], devices=["GPU:0"]), "--devices works with --strategy auto or mirrored"),
    (dict(name="multi-worker", gpus=[], devices=["CPU:0"]), "CUDA_VISIBLE_DEVICES"),
    (dict(name="mirrored", gpus=["GPU:0"], devices=["GPU:1"]), "unknown device 'GPU:1'; this machine has GPU:0, CPU:0"),
    (dict(name="mirrored", gpus=[], devices=["TPU:0"], cpu_replicas=2), "this machine has CPU:0, CPU:1"),
    (dict(name="mirrored", gpus=["GPU:0"], devices=["GPU:0", "gpu:0"]), "GPU:0 is listed twice"),
    (dict(name="horovod", gpus=[]), "unknown strategy 'horovod'"),
])
def test_bad_strategy_requests(kwargs, message):
    with pytest.raises(KernormError) as error:
        choose_strategy(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("args, env, message", [
    (["--strategy", "multi-worker"], {"TF_CONFIG": "{oops"}, "TF_CONFIG is not a cluster and task description"),
    (["--strategy", "multi-worker"], {"TF_CONFIG": ""}, "needs the TF_CONFIG environment variable"),
    (["--strategy", "mirrored", "--devices", "GPU:99"], {}, "unknown device 'GPU:99'"),
    (["--devices", "CPU:0,CPU:7"], {}, "unknown device 'CPU:7'"),
    (["--strategy", "default", "--cpu-replicas", "2"], {}, "--cpu-replicas works with --strategy mirrored only"),
    (["--precision", "float8"], {}, "Invalid value for '--precision'"),
])
def test_cli_strategy_errors_are_one_line(tmp_path, data_dir, args, env, message):
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["train", "--limit", "64", "--epochs", "1", "--data-dir", data_dir,
                                       "--out", str(out)] + args, env=env)
    assert result.exit_code == (2 if "Invalid value" in message else 1)
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert not out.exists()
