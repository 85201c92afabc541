"""Several replicas on this CPU: MirroredStrategy over logical CPU devices, and two workers on 127.0.0.1.

TensorFlow splits the CPU into logical devices once per process, so each case runs in subprocesses.
"""

import json
import os
import pathlib
import re
import socket
import subprocess

import numpy as np
import pytest
from helpers import FINISHED_RUN, TIMEOUT, assert_same_run, kernorm_command, kill_after_backup, run_python

from kernorm.models import load_model, weights_digest
from kernorm.rundir import read_history

HERE = pathlib.Path(__file__).parent
pytestmark = pytest.mark.slow  # every test runs TensorFlow in two processes, or two of them at once


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("two_replicas")
    result = run_python([str(HERE / "two_replicas.py"), str(out)], env={**os.environ, "KERNORM_DATA_DIR": data_dir})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), out


def test_mirrored_step_equals_single_replica_step(two_replicas):
    """Two replicas each take half the global batch; summed gradients give the one-replica step (LN + L2)."""
    results, _ = two_replicas
    assert results["replicas"] == 2
    assert results["ln_difference"] < 1e-5
    assert results["ln_uneven_difference"] < 1e-5  # 3 + 2 images: each replica divides by the global 5


def test_synchronized_bn_takes_statistics_of_the_global_batch(two_replicas):
    results, _ = two_replicas
    moving_mean = np.array(results["moving_mean"])
    # Keras's moving mean starts at 0 and moves by (1 - momentum) = 0.1 towards the batch mean;
    # TensorFlow's float32 sums over 64×26×26 values are good to a few 1e-6.
    np.testing.assert_allclose(moving_mean, 0.1 * np.array(results["whole_batch_mean"]), atol=1e-5)
    for half in results["half_batch_means"]:
        assert np.abs(moving_mean - 0.1 * np.array(half)).max() > 1e-4
    # The whole step: synchronized BN matches one replica to float32 noise (Keras computes the
    # synchronized variance as E[x²] - E[x]²); per-replica statistics are off by far more.
    assert results["bn_difference"] < 2e-4 < results["bn_unsynchronized_difference"]


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_mirrored_training_runs_and_saves_a_plain_float32_model(two_replicas, precision):
    results, out = two_replicas
    run = results["runs"][precision]
    assert run["metrics"]["epochs_completed"] == 1 and 0 <= run["metrics"]["final_test_acc"] <= 1
    assert run["files"] == FINISHED_RUN  # backup removed
    model = load_model(str(out / precision / "model.keras"))
    layers = list(all_layers(model))
    assert {layer.dtype_policy.name for layer in layers} == {"float32"}
    assert not [layer for layer in layers if getattr(layer, "synchronized", False)]


def all_layers(layer):
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from all_layers(inner)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(command, scratch_root):
    """Starts `command` as both workers of a fresh two-worker cluster on 127.0.0.1; returns the processes."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        scratch = scratch_root / f"tmp{index}"
        scratch.mkdir(parents=True)
        env = {**os.environ, "TMPDIR": str(scratch),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True))
    return workers


def finish(workers):
    """Waits for the workers and returns their outputs; any still running after TIMEOUT is killed."""
    try:
        return [worker.communicate(timeout=TIMEOUT)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def multi_worker_command(data_dir, run_dir, epochs):
    return kernorm_command("train", "--strategy", "multi-worker", "--norm", "bn", "--epochs", epochs,
                           "--limit", 640, "--deterministic", "--data-dir", data_dir, "--out", run_dir)


def test_two_workers_train_in_sync(tmp_path, data_dir):
    """Every worker runs the same command; the chief writes the run folder, the other worker only scratch."""
    run_dir = tmp_path / "run"
    workers = start_workers(multi_worker_command(data_dir, run_dir, epochs=1), tmp_path)
    outputs = finish(workers)
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    digests = [re.search(r"Final weights digest (\w+)", output)[1] for output in outputs]
    assert "(the chief wrote the run folder)" in outputs[1]
    assert sorted(os.listdir(run_dir)) == FINISHED_RUN
    assert weights_digest(load_model(str(run_dir / "model.keras"))) == digests[0] == digests[1]
    assert "2 replica(s)" in outputs[0] and "BN statistics synchronized" in outputs[0]
    assert os.listdir(tmp_path / "tmp1") == []  # the other worker's scratch space is gone


def test_two_killed_workers_resume_with_the_same_command(tmp_path, data_dir):
    """Both workers SIGKILLed after epoch 2: started again, both resume and end as an unbroken run."""
    run_dir = tmp_path / "run"
    command = multi_worker_command(data_dir, run_dir, epochs=6)
    workers = start_workers(command, tmp_path / "killed")
    kill_after_backup(workers, run_dir / "backup")
    assert 2 <= len(read_history(run_dir)) < 6

    workers = start_workers(command, tmp_path / "resumed")
    outputs = finish(workers)
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    for output in outputs:
        assert f"Resuming the unfinished run in {run_dir} from its backup" in output
        assert "Epoch 1/6" not in output and "Epoch 6/6" in output
    assert sorted(os.listdir(run_dir)) == FINISHED_RUN
    digests = [re.search(r"Final weights digest (\w+)", output)[1] for output in outputs]
    assert digests[0] == digests[1]

    reference_dir = tmp_path / "reference"
    workers = start_workers(multi_worker_command(data_dir, reference_dir, epochs=6), tmp_path / "reference_tmp")
    finish(workers)
    assert [worker.returncode for worker in workers] == [0, 0]
    assert_same_run(run_dir, reference_dir)
