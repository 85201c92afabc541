"""Training the study's network: configuration, the training loop, and the run folder.

The loop is a custom step under a `tf.distribute` strategy rather than
`model.fit`, because Keras 3's `fit` does not run under
`MultiWorkerMirroredStrategy`; one loop then serves a CPU, GPUs and several
machines alike.
"""

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import time

from kernorm.errors import KernormError
from kernorm.files import atomic_path, write_json, write_text

# Training steps run per call into the compiled graph: fewer Python round trips.
STEPS_PER_CALL = 50
EVAL_BATCH_SIZE = 1000
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"]


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run; saved as `config.json` in the run folder.

    Defaults are the study's set-up: SGD with constant lr 0.01 and momentum 0.9,
    batch 128, 25 epochs, seed 1.
    """

    norm: str = "bn"
    groups: int = 2
    l1: float = 0.0
    l2: float = 0.0
    dropout: float | None = None
    dropout_layers: str = "last"
    epochs: int = 25
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 1
    data_dir: str | None = None
    limit: int | None = None
    out: str | None = None
    deterministic: bool = False
    tensorboard: bool = False

    @property
    def run_dir(self):
        """The run folder: `out`, or `runs/<norm>[-l1_X][-l2_X]-seed<seed>`."""
        if self.out:
            return self.out
        parts = [self.norm] + [f"{k}_{v:g}" for k, v in (("l1", self.l1), ("l2", self.l2)) if v]
        return os.path.join("runs", "-".join(parts + [f"seed{self.seed}"]))

    def save(self, path):
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path):
        """Reads a `config.json`; unknown keys are an error, missing ones take defaults."""
        try:
            with open(path) as f:
                data = json.load(f)
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise KernormError(f"{path}: not a kernorm training config ({e})") from None


def prepare_run_dir(run_dir, overwrite):
    """Creates an empty output folder; an existing one is replaced only with `overwrite`.

    Serves every command that writes a folder with its `config.json` (train, export).
    """
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not overwrite:
            raise KernormError(f"output folder {run_dir} already exists; pass --overwrite or choose another --out")
        if not os.path.exists(os.path.join(run_dir, "config.json")):
            raise KernormError(f"{run_dir} is not a kernorm output folder (no config.json); refusing to overwrite it")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


def _history_csv(history):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def summarize(history, params, wall_time, interrupted):
    """The run's `metrics.json`: final and best test accuracy, best epoch, and wall time."""
    best = max(history, key=lambda row: row["test_acc"]) if history else None
    return {
        "params": params,
        "epochs_completed": len(history),
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "best_train_acc": max(row["train_acc"] for row in history) if history else None,
        "seconds_per_epoch": sum(r["seconds"] for r in history) / len(history) if history else None,
        "wall_time": wall_time,
        "interrupted": interrupted,
    }


def _compile_runner(strategy, replica_fn):
    """A graph that runs `replica_fn` on `steps` batches and sums its [loss, correct, count]."""
    import tensorflow as tf

    @tf.function
    def run(iterator, steps):
        totals = tf.zeros(3)
        for _ in tf.range(steps):
            sums = strategy.run(replica_fn, args=next(iterator))
            totals += strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)
        return totals

    return run


def make_steps(model, optimizer, strategy):
    """The compiled training and evaluation graphs for `model`.

    Returns:
        `(train, evaluate)`: each takes a (distributed) dataset iterator and a
        step count and returns the summed cross-entropy, correct predictions and
        image count over those steps. `train` also updates the weights.
    """
    import keras
    import tensorflow as tf

    def sums(per_example_loss, logits, labels):
        correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        return tf.stack([tf.reduce_sum(per_example_loss), tf.reduce_sum(tf.cast(correct, tf.float32)),
                         tf.cast(tf.size(labels), tf.float32)])

    def train_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example)
            if model.losses:  # the kernel regularizers' l1·Σ|w| + l2·Σw²
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return sums(per_example, logits, labels)

    def eval_step(images, labels):
        logits = model(images, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return sums(per_example, logits, labels)

    return _compile_runner(strategy, train_step), _compile_runner(strategy, eval_step)


def _epoch_row(epoch, train_totals, test_totals, lr, seconds):
    train_loss, train_correct, train_n = (float(v) for v in train_totals)
    test_loss, test_correct, test_n = (float(v) for v in test_totals)
    return {"epoch": epoch, "train_loss": train_loss / train_n, "train_acc": train_correct / train_n,
            "test_loss": test_loss / test_n, "test_acc": test_correct / test_n,
            "lr": lr, "seconds": seconds}


def train(config, overwrite=False, verbose=True):
    """Trains the study's network as `config` says and writes its run folder.

    The folder gets `config.json`, then after every epoch `history.csv`,
    `metrics.json` and `model.keras` (the weights after that epoch), each
    written whole or not at all. Ctrl-C stops after keeping the finished epochs.

    Args:
        config: a `TrainConfig`.
        overwrite: replace an existing run folder.
        verbose: print the model summary, a progress bar per epoch and test figures.

    Returns:
        The metrics dict also written to `metrics.json`.
    """
    import keras
    import tensorflow as tf

    from kernorm.data import load_mnist, make_dataset
    from kernorm.models import build_model, count_trainable

    run_dir = config.run_dir
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    (x_train, y_train), (x_test, y_test) = load_mnist(config.data_dir)
    if config.limit:
        x_train, y_train = x_train[:config.limit], y_train[:config.limit]
    model = build_model(config.norm, l1=config.l1, l2=config.l2, dropout=config.dropout,
                        dropout_layers=config.dropout_layers, groups=config.groups)
    prepare_run_dir(run_dir, overwrite)
    config.save(os.path.join(run_dir, "config.json"))

    strategy = tf.distribute.get_strategy()
    optimizer = keras.optimizers.SGD(learning_rate=config.lr, momentum=config.momentum)
    train_steps, evaluate = make_steps(model, optimizer, strategy)
    train_ds = strategy.experimental_distribute_dataset(
        make_dataset(x_train, y_train, config.batch_size, shuffle_seed=config.seed))
    test_ds = strategy.experimental_distribute_dataset(make_dataset(x_test, y_test, EVAL_BATCH_SIZE))
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    test_steps = math.ceil(len(x_test) / EVAL_BATCH_SIZE)
    params = count_trainable(model)
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard")) if config.tensorboard else None
    if verbose:
        model.summary(expand_nested=True)
        print(f"Trainable parameters: {params:,}")

    history, interrupted, start = [], False, time.perf_counter()
    try:
        for epoch in range(1, config.epochs + 1):
            if verbose:
                print(f"Epoch {epoch}/{config.epochs}")
            bar = keras.utils.Progbar(steps_per_epoch, verbose=int(verbose), stateful_metrics=["loss", "acc"])
            iterator, totals, done, t0 = iter(train_ds), tf.zeros(3), 0, time.perf_counter()
            while done < steps_per_epoch:
                steps = min(STEPS_PER_CALL, steps_per_epoch - done)
                totals += train_steps(iterator, tf.constant(steps))
                done += steps
                bar.update(done, [("loss", float(totals[0] / totals[2])), ("acc", float(totals[1] / totals[2]))])
            seconds = time.perf_counter() - t0
            row = _epoch_row(epoch, totals, evaluate(iter(test_ds), tf.constant(test_steps)),
                             float(f"{optimizer.learning_rate.numpy():.6g}"), seconds)
            history.append(row)
            _save_epoch(run_dir, model, history, params, time.perf_counter() - start)
            if writer:
                with writer.as_default(step=epoch):
                    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
                        tf.summary.scalar(key, row[key])
            if verbose:
                print(f"test_loss {row['test_loss']:.4f} - test_acc {row['test_acc']:.4f} - {seconds:.1f}s")
    except KeyboardInterrupt:
        interrupted = True
    metrics = summarize(history, params, time.perf_counter() - start, interrupted)
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    return metrics


def _save_epoch(run_dir, model, history, params, wall_time):
    write_text(os.path.join(run_dir, "history.csv"), _history_csv(history))
    write_json(os.path.join(run_dir, "metrics.json"), summarize(history, params, wall_time, False))
    with atomic_path(os.path.join(run_dir, "model.keras")) as tmp:
        model.save(tmp)
