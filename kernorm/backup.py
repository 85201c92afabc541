"""Backups of a training run in progress, so that a killed run resumes where it stopped.

Keras's `BackupAndRestore` callback serves `model.fit`; kernorm trains with a
custom loop (Keras 3's `fit` does not run under MultiWorkerMirroredStrategy),
so it keeps the same state itself, as TensorFlow's custom-loop guides do: a
`tf.train.Checkpoint` of the model, the optimizer and the loop's counters,
managed by a `tf.train.CheckpointManager` that keeps the latest two, so that
a damaged latest backup still leaves one to resume from.
"""

import json
import os
import shutil
import sys

import tensorflow as tf

from kernorm.errors import KernormError


def has_backup(directory):
    """Whether `directory` holds a finished backup (a checkpoint its index names)."""
    return os.path.isdir(directory) and tf.train.latest_checkpoint(directory) is not None


def is_backup_folder(directory):
    """Whether `directory` holds a backup that a `Backup` wrote: its latest checkpoint keeps the loop's
    history, which another program's checkpoints do not."""
    if not has_backup(directory):
        return False
    try:
        names = [name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(directory))]
    except (tf.errors.OpError, ValueError):  # a damaged index: nothing shows whose it is
        return False
    return any(name.startswith("history/") for name in names)


# Backups kept: the latest, and the one before it in case the latest is damaged.
KEEP = 2


class Backup:
    """The state a rerun of the same training command resumes from.

    It holds the model's and the optimizer's variables (weights, BN moving
    statistics, momentum, step count) and where the loop stood: `epoch`
    finished epochs, `step` steps into the next one, the running `totals`
    ([summed loss, correct predictions, images]) and `seconds` of those steps,
    and the `history` rows of the finished epochs. A checkpoint is written
    whole before its index names it, so a killed process leaves the previous
    backup intact.

    Args:
        directory: the backup folder, read on resume.
        model: the Keras model being trained.
        optimizer: its optimizer, built (its variables exist).
        write_dir: where this process writes; default `directory`. The
            non-chief workers of multi-worker training take part in every save
            (saving may need collective ops) but write to scratch space that is
            removed after each save, as Keras's multi-worker guide does.
    """

    def __init__(self, directory, model, optimizer, write_dir=None):
        self.directory = directory
        self.write_dir = write_dir or directory
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.totals = tf.Variable(tf.zeros(3), trainable=False)
        self.seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.history_json = tf.Variable("[]", trainable=False)
        self._checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, epoch=self.epoch, step=self.step, totals=self.totals,
            seconds=self.seconds, history=self.history_json)
        self._manager = tf.train.CheckpointManager(self._checkpoint, self.write_dir, max_to_keep=KEEP)

    @property
    def history(self):
        """The history rows of the finished epochs, as saved."""
        return json.loads(self.history_json.numpy().decode())

    def restore(self):
        """Loads the latest readable backup of `directory` into the model, optimizer and counters.

        When the latest cannot be read, the one before it is loaded, and one
        line on stderr says so.
        """
        state = tf.train.get_checkpoint_state(self.directory)
        paths = list(reversed(state.all_model_checkpoint_paths)) if state else []
        if not paths:
            raise KernormError(f"backup folder {self.directory} holds no backup to resume from; "
                               f"pass --overwrite to start the run afresh")
        failures = []
        for path in paths:
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as e:  # TensorFlow's reader fails on a damaged file in many ways; each means the same
                failures.append(f"{os.path.basename(path)}: {type(e).__name__}")
                continue
            if failures:
                print(f"The latest backup in {self.directory} cannot be read ({failures[0]}); resuming from "
                      f"the one before it, {os.path.basename(path)}", file=sys.stderr, flush=True)
            return
        raise KernormError(f"no backup in {self.directory} can be read or fits the run ({'; '.join(failures)}); "
                           f"the finished epochs' files are kept; pass --overwrite to train the run afresh")

    def save(self, epoch, step, totals, seconds, history):
        """Backs up the model and optimizer as they are now, with the loop's position.

        Args:
            epoch: epochs finished.
            step: steps done of the next epoch (0 at an epoch's end).
            totals: `[summed loss, correct, images]` of those steps.
            seconds: training seconds of those steps.
            history: the history rows of the finished epochs.
        """
        self.epoch.assign(epoch)
        self.step.assign(step)
        self.totals.assign(totals)
        self.seconds.assign(seconds)
        self.history_json.assign(json.dumps(history))
        self._manager.save()
        if self.write_dir != self.directory:
            shutil.rmtree(self.write_dir, ignore_errors=True)

    def remove(self):
        """Deletes the backup: the run has finished and will not resume."""
        shutil.rmtree(self.write_dir, ignore_errors=True)
