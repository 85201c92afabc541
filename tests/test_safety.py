"""Runs that cannot be spoiled: a locked run folder, a backup that survives damage, a diverging run that
stops, a full disk in one line, and a console with nothing but kernorm's own lines."""

import errno
import glob
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TIMEOUT, kernorm_command, read_json, run, run_python

from kernorm import rundir
from kernorm.cli import main
from kernorm.config import TrainConfig
from kernorm.errors import KernormError
from kernorm.train import train

# What TensorFlow and LiteRT print on their own, none of which a user should see.
NATIVE_NOISE = re.compile(r"absl::InitializeLog|^[IWE]\d{4} |cuInit|fully_quantize|XNNPACK delegate|oneDNN",
                          re.MULTILINE)


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    folder = str(tmp_path / "run")
    with rundir.locked(folder):
        holder = f"PID {os.getpid()} on "
        assert holder in open(tmp_path / ".run.lock").read()
        other = run_python(["-c", f"from kernorm import rundir\nwith rundir.locked({folder!r}): pass"])
        assert other.returncode == 1 and f"{folder} is in use by {holder}" in other.stderr
    assert not os.path.exists(tmp_path / ".run.lock")  # nothing stale once released
    with rundir.locked(folder):  # and free to take again
        pass


@pytest.mark.slow
def test_two_real_processes_on_one_run_folder_and_a_killed_holder(tmp_path, data_dir):
    out = tmp_path / "run"
    command = kernorm_command("train", "--epochs", "30", "--limit", "3000", "--data-dir", data_dir, "--out", out)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "history.csv").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = run(command)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == (
            f"Error: {out} is in use by PID {first.pid} on {os.uname().nodename}; wait for that run to end, "
            f"or choose another --out")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = run([*command[:command.index("30")], "2", *command[command.index("30") + 1:], "--overwrite"])
    assert again.returncode == 0, again.stderr[-2000:]  # the killed holder's lock died with it


def _interrupt_at_epoch(monkeypatch, epoch):
    real, calls = rundir.write_epoch, []

    def write_then_interrupt(*args):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(rundir, "write_epoch", write_then_interrupt)


def _damage(path):
    with open(path, "r+b") as f:
        f.write(b"\xff" * os.path.getsize(path))


def test_a_damaged_latest_backup_falls_back_to_the_one_before(tmp_path, data_dir, monkeypatch, capsys):
    config = TrainConfig(norm="gn", epochs=3, limit=600, data_dir=data_dir, out=str(tmp_path / "r"),
                         deterministic=True)
    _interrupt_at_epoch(monkeypatch, 3)  # epochs 1 and 2 finished and backed up
    assert train(config, verbose=False)["interrupted"]
    monkeypatch.undo()
    latest = sorted(glob.glob(os.path.join(config.backup_path, "ckpt-*.data-*")))[-1]
    _damage(latest)
    metrics = train(config, verbose=False)
    assert capsys.readouterr().err.startswith(f"The latest backup in {config.backup_path} cannot be read (")
    assert metrics["epochs_completed"] == 3 and not metrics["interrupted"]
    assert [row["epoch"] for row in rundir.read_history(config.out)] == [1, 2, 3]


def test_no_readable_backup_stops_and_keeps_the_finished_epochs(tmp_path, data_dir, monkeypatch):
    config = TrainConfig(norm="ln", epochs=3, limit=600, data_dir=data_dir, out=str(tmp_path / "r"))
    _interrupt_at_epoch(monkeypatch, 3)
    train(config, verbose=False)
    monkeypatch.undo()
    for path in glob.glob(os.path.join(config.backup_path, "ckpt-*.data-*")):
        _damage(path)
    kept = sorted(os.listdir(config.out))
    with pytest.raises(KernormError, match=f"no backup in {re.escape(config.backup_path)} can be read"):
        train(config, verbose=False)
    assert sorted(os.listdir(config.out)) == kept and len(rundir.read_history(config.out)) == 2


def test_a_diverging_run_stops_at_once_and_keeps_its_finished_epochs(tmp_path, data_dir):
    config = TrainConfig(norm="none", epochs=2, lr=1000, limit=1000, data_dir=data_dir, out=str(tmp_path / "r"))
    with pytest.raises(KernormError, match=r"training diverged: the loss became (inf|nan) in epoch 1 by step \d+ "
                                           r"\(learning rate 1000\)"):
        train(config, verbose=False)
    assert read_json(config.out, "config.json")["lr"] == 1000


def test_a_merely_high_loss_is_not_an_error(tmp_path, data_dir):
    config = TrainConfig(norm="bn", epochs=1, lr=2.0, limit=1000, data_dir=data_dir, out=str(tmp_path / "r"))
    assert train(config, verbose=False)["epochs_completed"] == 1


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, data_dir, monkeypatch):
    def full(folder, *args):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "history.csv"))

    monkeypatch.setattr(rundir, "write_epoch", full)
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["train", "--epochs", "1", "--limit", "256", "--data-dir", data_dir,
                                       "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot write {out / 'history.csv'}: No space left on device; what was written before is kept; "
        f"free space, or choose a writable --out")
    assert (out / "config.json").is_file()


@pytest.mark.slow
def test_commands_print_kernorm_s_lines_only_unless_verbose(tmp_path, data_dir):
    out = tmp_path / "r"
    trained = run(kernorm_command("train", "--epochs", "1", "--limit", "512", "--data-dir", data_dir, "--out", out))
    assert trained.returncode == 0 and trained.stderr == ""
    assert "final test acc" in trained.stdout and not NATIVE_NOISE.search(trained.stdout)
    exported = run(kernorm_command("export", out, "--max-drop", "100", "--data-dir", data_dir))
    assert exported.returncode == 0 and exported.stderr == "" and not NATIVE_NOISE.search(exported.stdout)
    assert exported.stdout.splitlines()[-1] == f"all checks passed; export folder {out / 'export'}"
    image = tmp_path / "digit.npy"
    np.save(image, np.zeros((28, 28)))
    predicted = run(kernorm_command("predict", out / "export" / "model_int8.tflite", image))
    assert predicted.returncode == 0 and predicted.stderr == "" and predicted.stdout.startswith(f"{image}: ")
    failed = run(kernorm_command("train", "--epochs", "1", "--limit", "512", "--data-dir", data_dir, "--out", out))
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
        f"Error: run folder {out} already exists; pass --overwrite or choose another --out"]
    verbose = run(kernorm_command("--verbose", "predict", out / "export" / "model_int8.tflite", image))
    assert verbose.returncode == 0 and NATIVE_NOISE.search(verbose.stderr)
