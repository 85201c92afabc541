"""Helpers shared by the test modules: reading run folders, running kernorm in other processes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kernorm.rundir import read_history

TIMEOUT = 480  # seconds for a subprocess; generous for a machine shared with other TensorFlow jobs
# What a finished run folder holds (`kernorm.rundir`): kernorm's mark, no backup, no temporary files.
FINISHED_RUN = [".kernorm", "config.json", "history.csv", "metrics.json", "model.keras", "test_predictions.npy"]
COMPARED = ["train_loss", "train_acc", "test_loss", "test_acc", "lr"]


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def kernorm_command(*args):
    """The command line that runs `kernorm args...` with this interpreter."""
    return [sys.executable, "-m", "kernorm", *map(str, args)]


def run(command, **kwargs):
    """Runs `command` to its end and returns the finished process, output captured; killed after TIMEOUT."""
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def run_python(args, **kwargs):
    """Runs `python args...` with this interpreter (see `run`)."""
    return run([sys.executable, *args], **kwargs)


def report_worker(config):
    """Stands in for `kernorm.sweep.train_or_resume` in a training process: instead of training, writes
    `worker.json` into the run folder with the process's id and its GPU environment variables."""
    os.makedirs(config.run_dir, exist_ok=True)
    seen = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH")}
    with open(os.path.join(config.run_dir, "worker.json"), "w") as f:
        json.dump({"pid": os.getpid(), **seen}, f)
    return {"interrupted": False, "final_test_acc": 0.0, "chosen_epoch": None}


def backed_up_epochs(backup_dir):
    """Finished epochs in the latest backup; 0 while there is none (or it is being replaced)."""
    import tensorflow as tf

    try:
        path = tf.train.latest_checkpoint(str(backup_dir))
        return int(tf.train.load_variable(path, "epoch/.ATTRIBUTES/VARIABLE_VALUE")) if path else 0
    except (tf.errors.OpError, ValueError):
        return 0


def kill_after_backup(processes, backup_dir, epochs=2):
    """SIGKILLs every one of `processes` (all training one run) once `epochs` epochs are backed up."""
    try:
        deadline = time.monotonic() + TIMEOUT
        while backed_up_epochs(backup_dir) < epochs and all(p.poll() is None for p in processes):
            assert time.monotonic() < deadline, f"epoch {epochs} was not backed up in time"
            time.sleep(0.05)
        assert all(p.poll() is None for p in processes), "a process ended before it could be killed"
    finally:
        for process in processes:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert [p.returncode for p in processes] == [-signal.SIGKILL] * len(processes)


def assert_same_run(run_dir, reference_dir):
    """Same epochs, figures and final weights, to within floating-point noise."""
    from kernorm.models import load_model

    history, reference = read_history(run_dir), read_history(reference_dir)
    assert [row["epoch"] for row in history] == [row["epoch"] for row in reference]
    for row, expected in zip(history, reference):
        for key in COMPARED:
            assert row[key] == pytest.approx(expected[key], abs=1e-5), (row["epoch"], key)
    weights = load_model(os.path.join(run_dir, "model.keras")).get_weights()
    for a, b in zip(weights, load_model(os.path.join(reference_dir, "model.keras")).get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
