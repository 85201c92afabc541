"""Fault tolerance: a killed run, started again with the same command, resumes from its backup."""

import dataclasses
import os
import subprocess

import pytest
from click.testing import CliRunner
from helpers import FINISHED_RUN, assert_same_run, kernorm_command, kill_after_backup, read_json, run

import kernorm.backup
from kernorm.cli import main
from kernorm.config import TrainConfig
from kernorm.errors import KernormError
from kernorm.rundir import read_history
from kernorm.train import train

pytestmark = pytest.mark.slow  # every test here trains several short runs; one kills a subprocess


def test_sigkilled_run_resumes_with_the_same_command(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # Deterministic, as the in-process reference below must be: op determinism, once turned on
    # (by an earlier test, say), stays on in a process, and it changes the numerics a little.
    command = kernorm_command("train", "--norm", "bn", "--epochs", 6, "--limit", 640, "--deterministic",
                              "--data-dir", data_dir, "--out", run_dir)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_backup([process], run_dir / "backup")
    killed = read_history(run_dir)
    assert 2 <= len(killed) < 6  # whole files after the kill
    read_json(run_dir, "metrics.json")

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming the unfinished run in {run_dir} from its backup" in resumed.stdout
    assert "Epoch 1/6" not in resumed.stdout and "Epoch 6/6" in resumed.stdout
    assert sorted(os.listdir(run_dir)) == FINISHED_RUN
    assert read_json(run_dir, "metrics.json")["epochs_completed"] == 6

    reference = tmp_path / "reference"
    train(TrainConfig(norm="bn", epochs=6, limit=640, deterministic=True, data_dir=data_dir, out=str(reference)),
          verbose=False)
    assert_same_run(run_dir, reference)

    # Finished, the run has no backup: the same command again is refused, not resumed.
    again = CliRunner().invoke(main, command[3:])
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output


def test_resume_within_an_epoch_and_only_with_the_same_settings(tmp_path, data_dir, monkeypatch, capsys):
    config = TrainConfig(norm="bn", epochs=2, limit=640, backup_every=2, data_dir=data_dir, out=str(tmp_path / "r"))
    real_save = kernorm.backup.Backup.save

    def save_then_crash(self, epoch, step, *args):
        real_save(self, epoch, step, *args)
        if (epoch, step) == (1, 4):  # 4 of epoch 2's 5 steps are backed up
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(kernorm.backup.Backup, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, verbose=False)
    monkeypatch.undo()
    assert len(read_history(config.out)) == 1

    with pytest.raises(KernormError, match=r"holds an unfinished run with other settings \(epochs\)"):
        train(dataclasses.replace(config, epochs=3), verbose=False)
    capsys.readouterr()
    train(config, verbose=True)
    assert "from its backup: 1 epoch(s) and 4 step(s) done" in capsys.readouterr().out
    assert not os.path.exists(config.backup_path)

    reference = dataclasses.replace(config, out=str(tmp_path / "reference"))
    train(reference, verbose=False)
    assert_same_run(config.out, reference.out)


def test_backup_dir_elsewhere_and_overwrite(tmp_path, data_dir, monkeypatch):
    backup_dir = tmp_path / "elsewhere"
    config = TrainConfig(epochs=2, limit=256, data_dir=data_dir, out=str(tmp_path / "r"), backup_dir=str(backup_dir))
    real_save = kernorm.backup.Backup.save

    def save_then_interrupt(self, epoch, *args):
        real_save(self, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(kernorm.backup.Backup, "save", save_then_interrupt)
    assert train(config, verbose=False)["interrupted"]
    monkeypatch.undo()
    assert kernorm.backup.has_backup(str(backup_dir))  # Ctrl-C keeps the backup: the run can resume
    assert not os.path.exists(os.path.join(config.out, "backup"))

    metrics = train(config, overwrite=True, verbose=False)  # starts afresh, discarding the old backup
    assert metrics["epochs_completed"] == 2 and not backup_dir.exists()
    assert [row["epoch"] for row in read_history(config.out)] == [1, 2]

    backup_dir.mkdir()
    (backup_dir / "notes.txt").write_text("mine")
    with pytest.raises(KernormError, match="backup folder .* is not empty"):
        train(dataclasses.replace(config, out=str(tmp_path / "other")), verbose=False)
    assert (backup_dir / "notes.txt").exists()
