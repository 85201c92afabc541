"""Choosing the `tf.distribute` strategy that training runs under.

`choose_strategy` is a pure function of the requested strategy, the
machine's GPUs and `TF_CONFIG`: it validates them and returns a
`StrategyPlan`, which `make_strategy` turns into a strategy. Keeping the
choice pure lets it be tested with any device list, on a machine without GPUs.
"""

import dataclasses
import functools
import json
import os
import re

import tensorflow as tf

from kernorm.config import STRATEGIES
from kernorm.errors import KernormError, check_choice

# The task types MultiWorkerMirroredStrategy runs; "ps" and "evaluator" belong to other set-ups.
WORKER_TASKS = ("chief", "worker")
_DEVICE = re.compile(r"^/?(?:device:)?(cpu|gpu):(\d+)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class StrategyPlan:
    """What to run under: the strategy's kind and the devices it uses.

    Attributes:
        kind: "default" (TensorFlow's default strategy: one device, no
            replication), "one-device", "mirrored" or "multi-worker".
        devices: the local devices of "one-device" and "mirrored", as
            "GPU:0", "CPU:1", ...
        cpu_replicas: split the CPU into this many logical devices first.
        task: `(type, index)` of this process in `TF_CONFIG` ("multi-worker").
        chief: whether this process writes the run folder: always, except on
            the non-chief workers of "multi-worker".
    """

    kind: str
    devices: tuple = ()
    cpu_replicas: int | None = None
    task: tuple | None = None
    chief: bool = True

    def describe(self):
        """One line for the training log."""
        if self.kind == "multi-worker":
            role = "chief" if self.chief else "not the chief"
            return f"MultiWorkerMirroredStrategy: task {self.task[0]} {self.task[1]} ({role})"
        if self.kind == "default":
            return "default strategy (one device)"
        name = "MirroredStrategy" if self.kind == "mirrored" else "OneDeviceStrategy"
        return f"{name} over {', '.join(self.devices)}"


def _canonical(name):
    match = _DEVICE.match(name.strip())
    return f"{match[1].upper()}:{int(match[2])}" if match else None


def _pick(devices, available):
    chosen = []
    for name in devices:
        canonical = _canonical(name)
        if canonical not in available:
            raise KernormError(f"unknown device {name!r}; this machine has {', '.join(available)} "
                               f"(name devices like GPU:0 or CPU:1; --cpu-replicas N makes CPU:0..N-1)")
        if canonical in chosen:
            raise KernormError(f"device {canonical} is listed twice in --devices; list each device once")
        chosen.append(canonical)
    return tuple(chosen)


def parse_tf_config(tf_config):
    """Validates a `TF_CONFIG` string for MultiWorkerMirroredStrategy.

    Args:
        tf_config: the JSON text of the `TF_CONFIG` environment variable, or None.

    Returns:
        `(cluster, task_type, task_index)`: the cluster dict of lists of
        "host:port", and this process's task.
    """
    fix = ('set TF_CONFIG on every worker to '
           '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}}')
    if not tf_config:
        raise KernormError(f"--strategy multi-worker needs the TF_CONFIG environment variable; {fix}")
    try:
        config = json.loads(tf_config)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], task["index"]
    except (ValueError, TypeError, KeyError) as e:
        raise KernormError(f"TF_CONFIG is not a cluster and task description ({type(e).__name__}: {e}); "
                           f"{fix}") from None
    if not isinstance(cluster, dict) or not cluster:
        raise KernormError(f"TF_CONFIG's cluster must map task types to lists of addresses; {fix}")
    for kind, addresses in cluster.items():
        if kind not in WORKER_TASKS:
            raise KernormError(f"TF_CONFIG's cluster has {kind!r} tasks; multi-worker training runs "
                               f"{' and '.join(WORKER_TASKS)} tasks only")
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and re.match(r"^[^\s:]+:\d+$", a) for a in addresses):
            raise KernormError(f"TF_CONFIG's cluster {kind!r} must be a list of \"host:port\" addresses, "
                               f"not {addresses!r}")
    if task_type not in cluster:
        raise KernormError(f"TF_CONFIG's task type {task_type!r} is not in its cluster ({', '.join(cluster)})")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise KernormError(f"TF_CONFIG's task index {index!r} is out of range: the cluster has "
                           f"{len(cluster[task_type])} {task_type} task(s)")
    return cluster, task_type, index


def choose_strategy(name, gpus, devices=None, cpu_replicas=None, tf_config=None):
    """Decides which strategy and devices `--strategy name` means on a machine.

    Args:
        name: one of `STRATEGIES`.
        gpus: the machine's GPUs, e.g. `["GPU:0", "GPU:1"]`.
        devices: the devices asked for with `--devices`, or None.
        cpu_replicas: logical CPU devices asked for with `--cpu-replicas`, or None.
        tf_config: the `TF_CONFIG` text ("multi-worker" only reads it).

    Returns:
        A `StrategyPlan`. "auto" is MirroredStrategy over all GPUs when there
        are two or more, OneDeviceStrategy on the one GPU, and the default
        strategy without GPUs; "mirrored" uses `devices`, else the
        `cpu_replicas` logical CPUs, else all GPUs.
    """
    check_choice("strategy", name, STRATEGIES)
    if cpu_replicas is not None and name != "mirrored":
        raise KernormError(f"--cpu-replicas works with --strategy mirrored only, not {name}")
    if cpu_replicas is not None and cpu_replicas < 1:
        raise KernormError(f"--cpu-replicas must be 1 or more, not {cpu_replicas}")
    if devices and name in ("default", "multi-worker"):
        raise KernormError(f"--devices works with --strategy auto or mirrored, not {name}"
                           + (" (limit a worker's GPUs with CUDA_VISIBLE_DEVICES)" if name == "multi-worker" else ""))
    gpus = tuple(_canonical(g) for g in gpus)
    available = gpus + tuple(f"CPU:{i}" for i in range(cpu_replicas or 1))
    chosen = _pick(devices, available) if devices else ()

    if name == "default":
        return StrategyPlan("default")
    if name == "multi-worker":
        cluster, task_type, index = parse_tf_config(tf_config)
        chief = task_type == "chief" or ("chief" not in cluster and index == 0)
        return StrategyPlan("multi-worker", task=(task_type, index), chief=chief)
    if name == "auto":
        chosen = chosen or gpus
        if not chosen:
            return StrategyPlan("default")
        return StrategyPlan("one-device" if len(chosen) == 1 else "mirrored", chosen)
    chosen = chosen or (available[len(gpus):] if cpu_replicas else gpus)
    if not chosen:
        raise KernormError("--strategy mirrored found no GPU; pass --cpu-replicas N to split the CPU "
                           "into N replicas, or --devices")
    return StrategyPlan("mirrored", chosen, cpu_replicas)


def plan_strategy(name, devices=None, cpu_replicas=None):
    """`choose_strategy` on this machine: its GPUs and its `TF_CONFIG` environment variable."""
    gpus = [d.name.split("physical_device:")[-1] for d in tf.config.list_physical_devices("GPU")]
    return choose_strategy(name, gpus, devices, cpu_replicas, os.environ.get("TF_CONFIG"))


def split_cpu(replicas):
    """Splits the CPU into `replicas` logical devices CPU:0..N-1.

    TensorFlow allows this only before it runs its first operation; asking
    again for the same split later is a no-op.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == replicas:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        raise KernormError(f"cannot split the CPU into {replicas} replicas: TensorFlow has already started in "
                           f"this process; use --cpu-replicas in a fresh process (e.g. the kernorm command)") from None


def make_strategy(plan):
    """Creates the `tf.distribute.Strategy` that `plan` describes.

    Call it before TensorFlow runs anything else: logical CPU devices and
    MultiWorkerMirroredStrategy can only be set up at the start of a process.
    """
    if plan.cpu_replicas:
        split_cpu(plan.cpu_replicas)
    if plan.kind == "default":
        return tf.distribute.get_strategy()
    return _strategy(plan.kind, plan.devices)


@functools.cache
def _strategy(kind, devices):
    # One strategy per kind and devices in a process: every MirroredStrategy numbers its
    # collective ops from the same start, so a second one over the same devices would reuse
    # the first one's keys for other tensors and abort ("Shape mismatch in the collective").
    if kind == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy([f"/{d}" for d in devices])
    return tf.distribute.OneDeviceStrategy(f"/{devices[0]}")
