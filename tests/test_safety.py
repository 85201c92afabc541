"""Runs that cannot be spoiled: a locked run folder, a backup that survives damage, a diverging run that
stops, a full disk in one line, and a console with nothing but kernorm's own lines."""

import errno
import glob
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import FINISHED_RUN, TIMEOUT, kernorm_command, read_json, run, run_python

from kernorm import rundir, sweep
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


# --- What --overwrite may replace, bad --out folders, and a run killed while it finishes ---


def _user_folder(path):
    """A user's project folder with a `config.json` of its own, and what it holds."""
    (path / "src").mkdir(parents=True)
    (path / "src" / "main.py").write_text("print('mine')\n")
    (path / "notes.md").write_text("my notes\n")
    (path / "config.json").write_text('{"project": "mine"}\n')
    return _contents(path)


def _contents(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _one_error_line(result):
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    """A finished 1-epoch run on 256 images, to export and to copy (its folder must stay unchanged)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(norm="ln", epochs=1, limit=256, data_dir=data_dir, out=str(out)), verbose=False)
    return out


def _train_args(data_dir, out):
    return ["train", "--norm", "ln", "--epochs", "1", "--limit", "256", "--data-dir", data_dir, "--out", out]


@pytest.mark.parametrize("overwrite", [["--overwrite"], []])
def test_a_user_folder_with_a_config_json_is_left_alone(tmp_path, data_dir, finished_run, overwrite):
    project = tmp_path / "myproject"
    before = _user_folder(project)
    trained = _invoke(*_train_args(data_dir, project), *overwrite)
    assert _one_error_line(trained) == (f"Error: {project} is a folder kernorm did not make, not a kernorm run "
                                        f"folder; nothing in it is changed: choose another --out")
    exported = _invoke("export", finished_run, "--out", project, *overwrite, "--data-dir", data_dir)
    assert _one_error_line(exported) == (f"Error: {project} is a folder kernorm did not make, not a kernorm export "
                                         f"folder; nothing in it is changed: choose another --out")
    assert _contents(project) == before


def test_overwrite_replaces_kernorm_s_own_folder_of_the_same_kind_only(tmp_path, data_dir, finished_run):
    run_before = _contents(finished_run)
    exported = _invoke("export", finished_run, "--out", finished_run.parent / "other", "--overwrite",
                       "--data-dir", data_dir)
    assert exported.exit_code == 0, exported.output
    # An export folder is not a run folder, nor the other way round.
    as_run = _invoke(*_train_args(data_dir, finished_run.parent / "other"), "--overwrite")
    assert f"{finished_run.parent / 'other'} is kernorm's export folder, not a kernorm run folder" in (
        _one_error_line(as_run))
    as_export = _invoke("export", tmp_path / "m.keras", "--out", finished_run, "--overwrite", "--data-dir", data_dir)
    assert "m.keras not found" in _one_error_line(as_export)  # the model is looked for first: nothing is touched
    (tmp_path / "m.keras").write_bytes((finished_run / "model.keras").read_bytes())
    as_export = _invoke("export", tmp_path / "m.keras", "--out", finished_run, "--overwrite", "--data-dir", data_dir)
    assert f"{finished_run} is kernorm's run folder, not a kernorm export folder" in _one_error_line(as_export)
    assert _contents(finished_run) == run_before
    # Its own kind is replaced: a run folder, and one an earlier kernorm wrote without the mark.
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "notes.md").write_text("gone with the run\n")
    assert _invoke(*_train_args(data_dir, copy), "--overwrite").exit_code == 0
    assert not (copy / "notes.md").exists() and sorted(os.listdir(copy)) == FINISHED_RUN
    os.remove(copy / ".kernorm")
    (copy / "notes.md").write_text("gone with the run\n")
    assert _invoke(*_train_args(data_dir, copy), "--overwrite").exit_code == 0
    assert not (copy / "notes.md").exists() and sorted(os.listdir(copy)) == FINISHED_RUN


def test_a_backup_dir_that_is_not_kernorm_s_backup_is_left_alone(tmp_path, data_dir):
    import tensorflow as tf

    checkpoints = tmp_path / "checkpoints"  # another program's TensorFlow checkpoints
    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(checkpoints / "ckpt"))
    before = _contents(checkpoints)
    result = _invoke(*_train_args(data_dir, tmp_path / "r"), "--backup-dir", checkpoints, "--overwrite")
    assert _one_error_line(result) == (f"Error: {checkpoints} holds files but no kernorm backup; nothing in it is "
                                       f"changed: choose another --backup-dir")
    assert _contents(checkpoints) == before and not (tmp_path / "r").exists()
    result = _invoke(*_train_args(data_dir, tmp_path / "r"), "--backup-dir", tmp_path)
    assert _one_error_line(result) == (f"Error: --backup-dir {tmp_path} holds the run folder {tmp_path / 'r'}, and "
                                       f"the backup is deleted when the run finishes; choose a --backup-dir outside "
                                       f"it")


def test_sweep_and_reproduce_write_into_no_user_folder(tmp_path, data_dir):
    project = tmp_path / "myproject"
    before = _user_folder(project)
    swept = _invoke("sweep", "--norm", "ln", "--seeds", "1", "--epochs", "1", "--limit", "256", "--data-dir",
                    data_dir, "--out", project)
    assert _one_error_line(swept) == (f"Error: {project} is a folder kernorm did not make, not a kernorm sweep "
                                      f"folder; nothing in it is changed: choose another --out")
    reproduced = _invoke("reproduce", "--epochs", "1", "--limit", "256", "--data-dir", data_dir, "--out", project)
    assert "not a kernorm report folder" in _one_error_line(reproduced)
    assert _contents(project) == before


def _not_writable(monkeypatch, folder):
    # Permissions do not bind root, who runs the tests in containers: the check itself is made to fail.
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(folder) and real(path, mode))


@pytest.mark.parametrize("case", ["file", "under a file", "not writable"])
def test_a_bad_out_is_one_line_and_loses_nothing(tmp_path, data_dir, finished_run, monkeypatch, case):
    (tmp_path / "a.txt").write_text("mine\n")
    out, message = {
        "file": (tmp_path / "a.txt", f"--out {tmp_path / 'a.txt'} is not a folder: {tmp_path / 'a.txt'} is a file"),
        "under a file": (tmp_path / "a.txt" / "run",
                         f"--out {tmp_path / 'a.txt' / 'run'} is not a folder: {tmp_path / 'a.txt'} is a file"),
        "not writable": (tmp_path / "locked" / "run",
                         f"--out {tmp_path / 'locked' / 'run'} cannot be written: {tmp_path / 'locked'} is not "
                         f"writable"),
    }[case]
    if case == "not writable":
        (tmp_path / "locked").mkdir()
        _not_writable(monkeypatch, tmp_path / "locked")
    before = _contents(tmp_path)
    for result in (_invoke(*_train_args(data_dir, out), "--overwrite"),
                   _invoke("export", finished_run, "--out", out, "--overwrite", "--data-dir", data_dir)):
        assert _one_error_line(result) == f"Error: {message}; choose another --out"
    assert _contents(tmp_path) == before


def test_export_into_the_run_it_exports_is_one_line(data_dir, finished_run):
    before = _contents(finished_run)
    for out in (finished_run, finished_run.parent):
        result = _invoke("export", finished_run, "--out", out, "--overwrite", "--data-dir", data_dir)
        assert _one_error_line(result) == (
            f"Error: --out {out} holds the model being exported, {finished_run / 'model.keras'}; choose a folder "
            f"outside it (the default is export/ beside the model)")
    assert _contents(finished_run) == before


class _Killed(Exception):
    """Stands for the process being killed at that point."""


def test_a_run_killed_while_it_finishes_is_not_reused_and_is_finished_by_a_rerun(tmp_path, data_dir, monkeypatch):
    config = TrainConfig(norm="gn", epochs=2, limit=300, validation=100, data_dir=data_dir, out=str(tmp_path / "r"))
    real = rundir.write_predictions

    def killed_at_the_final_predictions(folder, name, classes):
        if name == rundir.PREDICTIONS:
            raise _Killed
        real(folder, name, classes)

    monkeypatch.setattr(rundir, "write_predictions", killed_at_the_final_predictions)
    with pytest.raises(_Killed):
        train(config, verbose=False)
    monkeypatch.undo()
    metrics = read_json(config.out, "metrics.json")
    assert metrics["epochs_completed"] == 2 and not metrics["interrupted"]  # it looks finished, yet it is not
    assert rundir.why_not_reusable(config) == "it lacks test_predictions.npy"
    model = os.stat(os.path.join(config.out, "model.keras")).st_mtime_ns
    sweep.train_or_resume(config)  # what sweep and reproduce do with a run they cannot reuse
    assert rundir.why_not_reusable(config) is None and sorted(os.listdir(config.out)) == sorted(
        FINISHED_RUN + ["test_predictions_chosen.npy"])
    assert os.stat(os.path.join(config.out, "model.keras")).st_mtime_ns == model  # resumed: no epoch again
    assert len(rundir.read_history(config.out)) == 2


def test_a_finished_run_that_lost_a_file_is_trained_again(tmp_path, data_dir):
    config = TrainConfig(norm="ln", epochs=1, limit=300, validation=100, data_dir=data_dir, out=str(tmp_path / "r"))
    train(config, verbose=False)
    assert rundir.why_not_reusable(config) is None
    chosen = os.path.join(config.out, "test_predictions_chosen.npy")
    os.rename(chosen, chosen + ".away")
    assert rundir.why_not_reusable(config) == "it lacks test_predictions_chosen.npy"
    os.rename(chosen + ".away", chosen)
    os.remove(os.path.join(config.out, "test_predictions.npy"))
    assert rundir.why_not_reusable(config) == "it lacks test_predictions.npy"
    sweep.train_or_resume(config)  # no backup to finish from: trained again
    assert rundir.why_not_reusable(config) is None
