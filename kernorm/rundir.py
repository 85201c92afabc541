"""The run folder that `kernorm train` writes: its files, and when it is resumed, reused or replaced.

A run folder holds `config.json` (the `TrainConfig`), and after every epoch
`history.csv` (one row per epoch), `metrics.json` (see `summarize`) and
`model.keras` (the weights after that epoch, float32), each written whole or
not at all; `test_predictions.npy`, the finished run's predicted class of
every test image, and with a validation split `test_predictions_chosen.npy`,
those of the epoch chosen on it; `backup/` while the run is unfinished;
`tensorboard/` if asked for; and `.kernorm`, the mark of kernorm's run folder
(`kernorm.folders`). A run has finished once `test_predictions.npy` and then
`metrics.json` are written after its last epoch; its backup is removed only
after that, so a run killed while it finishes resumes and finishes again. Two
configurations train the same run when their `TrainConfig.identity()` is
equal: that one definition decides both resuming and reusing a finished run.
"""

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
import shutil
import socket

import numpy as np

from kernorm.backup import has_backup, is_backup_folder
from kernorm.config import TrainConfig
from kernorm.errors import KernormError
from kernorm.files import atomic_path, write_bytes, write_json, write_text
from kernorm.folders import check_own, check_writable, holds_files, inside, mark, saved_config

CONFIG = "config.json"
HISTORY = "history.csv"
METRICS = "metrics.json"
MODEL = "model.keras"
TENSORBOARD = "tensorboard"
PREDICTIONS = "test_predictions.npy"
CHOSEN_PREDICTIONS = "test_predictions_chosen.npy"


@contextlib.contextmanager
def locked(folder):
    """Holds an exclusive lock on `folder` while the block runs; refuses at once if another process holds it.

    The lock is an OS lock (`flock`) on the hidden file `.<name>.lock` beside
    the folder, so it dies with its process: a killed run leaves nothing
    stale. The file names the holder's PID and host, for the refusal's message.
    """
    parent, name = os.path.split(os.path.normpath(folder))
    path = os.path.join(parent, f".{name}.lock")
    os.makedirs(parent or ".", exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise KernormError(f"{folder} is in use by {holder}; wait for that run to end, or choose another "
                               f"--out") from None
        # A holder that just ended removed the file we opened: lock the file at the path instead.
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode())
    try:
        yield
    finally:
        os.remove(path)  # while still held, so no other process can lock this file and then lose it
        os.close(fd)


def _changed_fields(saved, config):
    """The names of the fields in which `config` trains another run than `saved`."""
    before = saved.identity()
    return [key for key, value in config.identity().items() if before[key] != value]


# How a run folder that an earlier kernorm wrote, before folders were marked, is known.
EARLIER_RUN = saved_config(CONFIG, TrainConfig)


def check_locations(config):
    """Raises a `KernormError` unless the run folder and the backup folder can be written, and the backup
    folder, deleted when the run finishes, holds no part of the run folder; changes nothing."""
    check_writable(config.run_dir, "--out")
    check_writable(config.backup_path, "--backup-dir")
    if inside(config.run_dir, config.backup_path):
        raise KernormError(f"--backup-dir {config.backup_path} holds the run folder {config.run_dir}, and the "
                           f"backup is deleted when the run finishes; choose a --backup-dir outside it")


def check_run_dir(config, overwrite):
    """Decides whether `config` starts afresh or resumes an unfinished run; changes nothing.

    A run folder that holds files must be kernorm's (`kernorm.folders`). It is
    resumed when its `config.json` trains the same run as `config` and its
    backup folder holds a backup (the run has not finished); otherwise it is
    replaced only with `overwrite`, and a backup folder outside it only when
    that holds a kernorm backup.

    Returns:
        True to resume, False to start afresh (with `start_run_dir`).
    """
    run_dir, backup_dir = config.run_dir, config.backup_path
    saved = os.path.join(run_dir, CONFIG)
    backed_up = has_backup(backup_dir)
    check_own(run_dir, "run", EARLIER_RUN)
    if overwrite:
        if holds_files(backup_dir) and not inside(backup_dir, run_dir) and not is_backup_folder(backup_dir):
            raise KernormError(f"{backup_dir} holds files but no kernorm backup; nothing in it is changed: "
                               f"choose another --backup-dir")
        return False
    if backed_up and os.path.isfile(saved):
        changed = _changed_fields(TrainConfig.load(saved), config)
        if not changed:
            return True
        raise KernormError(f"run folder {run_dir} holds an unfinished run with other settings "
                           f"({', '.join(changed)}); resume it with --config {saved}, or pass --overwrite")
    if holds_files(run_dir):
        raise KernormError(f"run folder {run_dir} already exists; pass --overwrite or choose another --out")
    if holds_files(backup_dir):
        raise KernormError(f"backup folder {backup_dir} is not empty; remove it or choose another --backup-dir")
    return False


def start_run_dir(config):
    """Empties the run and backup folders that `check_run_dir` let go, marks the run folder as kernorm's,
    and writes `config.json`."""
    for folder in (config.run_dir, config.backup_path):
        if os.path.isdir(folder):
            shutil.rmtree(folder)
    mark(config.run_dir, "run")
    config.save(os.path.join(config.run_dir, CONFIG))


def chosen_row(history):
    """The history row of the epoch with the best validation accuracy (the earliest of equals);
    None without a validation split."""
    if not history or "val_acc" not in history[0]:
        return None
    return max(history, key=lambda row: row["val_acc"])


def summarize(history, params, wall_time, interrupted):
    """The run's `metrics.json`.

    Final test accuracy and loss; with a validation split the epoch chosen on
    it (`chosen_epoch`) with its validation and test accuracy, and otherwise
    the best test epoch, as the study picked it (`best_epoch`,
    `best_test_acc`): with a validation split nothing is chosen by a test
    figure. Also the parameter count, the best training accuracy, seconds per
    epoch and wall time.
    """
    chosen = chosen_row(history)
    best = max(history, key=lambda row: row["test_acc"]) if history and not chosen else None
    return {
        "params": params,
        "epochs_completed": len(history),
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "final_test_loss": history[-1]["test_loss"] if history else None,
        "chosen_epoch": chosen["epoch"] if chosen else None,
        "chosen_val_acc": chosen["val_acc"] if chosen else None,
        "chosen_test_acc": chosen["test_acc"] if chosen else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "best_train_acc": max(row["train_acc"] for row in history) if history else None,
        "seconds_per_epoch": sum(r["seconds"] for r in history) / len(history) if history else None,
        "wall_time": wall_time,
        "interrupted": interrupted,
    }


def write_metrics(folder, metrics):
    write_json(os.path.join(folder, METRICS), metrics)


def write_epoch(folder, history, metrics, model):
    """Writes a finished epoch: `history.csv`, `metrics.json` and the Keras `model`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(os.path.join(folder, HISTORY), buf.getvalue())
    write_metrics(folder, metrics)
    with atomic_path(os.path.join(folder, MODEL)) as tmp:
        model.save(tmp)


def write_predictions(folder, name, classes):
    """Saves the predicted class of every test image, in test-set order, as a `.npy` file."""
    buf = io.BytesIO()
    np.save(buf, classes, allow_pickle=False)
    write_bytes(os.path.join(folder, name), buf.getvalue())


def read_predictions(folder, name=PREDICTIONS):
    """The predicted classes a run folder saved (see `write_predictions`)."""
    path = os.path.join(folder, name)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise KernormError(f"{path}: no readable test predictions ({e}); train the run to its end") from None


def read_history(folder):
    """The rows of a run folder's `history.csv`: `epoch` an int, every other column a float."""
    with open(os.path.join(folder, HISTORY)) as f:
        return [{key: (int(v) if key == "epoch" else float(v)) for key, v in row.items()}
                for row in csv.DictReader(f)]


@dataclasses.dataclass
class Run:
    """A run folder as written by `kernorm.train.train`."""

    path: str
    config: TrainConfig
    history: list
    metrics: dict

    @property
    def model_file(self):
        return os.path.join(self.path, MODEL)

    @property
    def label(self):
        """The study's way of naming an experiment: "BN + L1 + L2", "LN + L2", "GN + L1"."""
        norm = self.config.norm
        penalties = [name for name, v in (("L1", self.config.l1), ("L2", self.config.l2)) if v]
        return " + ".join(["no norm" if norm in (None, "none") else norm.upper()] + penalties)


def load_run(path):
    """Reads a run folder's `config.json`, `history.csv` and `metrics.json` into a `Run`."""
    for name in (CONFIG, HISTORY, METRICS):
        if not os.path.isfile(os.path.join(path, name)):
            raise KernormError(f"{path} is not a finished kernorm run folder (no {name}); "
                               f"pass a folder written by kernorm train")
    config = TrainConfig.load(os.path.join(path, CONFIG))
    try:
        history = read_history(path)
        with open(os.path.join(path, METRICS)) as f:
            metrics = json.load(f)
    except (OSError, ValueError, TypeError) as e:
        raise KernormError(f"{path}: unreadable {HISTORY} or {METRICS} ({e}); train the run again") from None
    if not history:
        raise KernormError(f"{path}: no finished epoch in {HISTORY}; train the run again")
    return Run(path, config, history, metrics)


def finished_files(config):
    """The names of the files a finished run of `config` holds, which the reports read."""
    return [HISTORY, METRICS, MODEL, PREDICTIONS] + ([CHOSEN_PREDICTIONS] if config.validation else [])


def why_not_reusable(config):
    """None when `config.run_dir` holds the finished run of `config`; otherwise the reason, in words.

    Finished means: its `metrics.json` counts every epoch, uninterrupted, and
    every one of `finished_files` is there. A run killed while it finished
    lacks `test_predictions.npy`, which the end of a run writes after the last
    epoch's files.
    """
    run_dir = config.run_dir
    try:
        with open(os.path.join(run_dir, METRICS)) as f:
            metrics = json.load(f)
        saved = TrainConfig.load(os.path.join(run_dir, CONFIG))
    except (OSError, ValueError, KernormError):  # missing, half-written or foreign: train it (again)
        return "no finished run there"
    if metrics.get("interrupted") or metrics.get("epochs_completed") != config.epochs:
        return f"it stopped after {metrics.get('epochs_completed')} of {config.epochs} epochs"
    changed = _changed_fields(saved, config)
    if changed:
        return f"it was trained with a different {', '.join(changed)}"
    missing = [name for name in finished_files(config) if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        return f"it lacks {', '.join(missing)}"
    return None
