"""Training: configuration and presets, the training loop, and the run folder.

The loop is a custom step under a `tf.distribute` strategy rather than
`model.fit`, because Keras 3's `fit` does not run under
`MultiWorkerMirroredStrategy`; one loop then serves a CPU, GPUs and several
machines alike.
"""

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import time

from kernorm.errors import KernormError, check_choice
from kernorm.files import atomic_path, remove_leftovers, write_json, write_text

# Training steps run per call into the compiled graph: fewer Python round trips.
STEPS_PER_CALL = 50
EVAL_BATCH_SIZE = 1000
HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"]
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
SCHEDULES = ("constant", "onecycle")
# The one-cycle schedule: a linear warm-up from lr / WARMUP_DIVISOR to lr over the
# first WARMUP_FRACTION of all steps, then a cosine decay to 0 at the last step.
WARMUP_FRACTION = 0.2
WARMUP_DIVISOR = 25


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run; saved as `config.json` in the run folder.

    Defaults are the study's set-up: its network, SGD with constant lr 0.01 and
    momentum 0.9, batch 128, 25 epochs, seed 1, no augmentation. `PRESETS`
    holds other recipes. `batch_size` is the global batch: each step splits it
    over the strategy's replicas. With `schedule="onecycle"`, `lr` is the peak
    learning rate (see `learning_rate`). `augment` rotates and shifts the
    training images in the input pipeline (`kernorm.data.augment`); the model
    never holds it.
    """

    architecture: str = "study"
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
    schedule: str = "constant"
    augment: bool = False
    seed: int = 1
    data_dir: str | None = None
    limit: int | None = None
    out: str | None = None
    deterministic: bool = False
    tensorboard: bool = False
    strategy: str = "auto"
    devices: list[str] | None = None
    cpu_replicas: int | None = None
    precision: str = "float32"
    backup_dir: str | None = None
    backup_every: int | None = None

    @property
    def run_dir(self):
        """The run folder: `out`, or `runs/[<architecture>-]<norm>[-l1_X][-l2_X]-seed<seed>`
        (the architecture named unless it is the study's)."""
        if self.out:
            return self.out
        parts = [] if self.architecture == "study" else [self.architecture]
        parts += [self.norm] + [f"{k}_{v:g}" for k, v in (("l1", self.l1), ("l2", self.l2)) if v]
        return os.path.join("runs", "-".join(parts + [f"seed{self.seed}"]))

    @property
    def backup_path(self):
        """The backup folder: `backup_dir`, or `backup` inside the run folder."""
        return self.backup_dir or os.path.join(self.run_dir, "backup")

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


# Training recipes by name; command-line options override their fields.
PRESETS = {
    "study": TrainConfig(),
    "compact": TrainConfig(architecture="compact", l2=2.5e-4, epochs=15, lr=0.1, schedule="onecycle",
                           augment=True),
}


def learning_rate(config, steps_per_epoch):
    """The optimizer's learning rate for `config`: a float, or a schedule over the run's steps.

    "constant" keeps `config.lr`. "onecycle" rises linearly from
    `lr / WARMUP_DIVISOR` to `lr` over the first `WARMUP_FRACTION` of the
    steps, then falls along a half cosine to 0 at the last step.
    """
    import keras

    if config.schedule == "constant":
        return config.lr
    total = config.epochs * steps_per_epoch
    warmup = max(1, round(total * WARMUP_FRACTION))
    return keras.optimizers.schedules.CosineDecay(
        config.lr / WARMUP_DIVISOR, decay_steps=max(1, total - warmup), alpha=0.0,
        warmup_target=config.lr, warmup_steps=warmup)


def _holds_files(folder):
    return os.path.isdir(folder) and bool(os.listdir(folder))


def check_run_dir(config, overwrite):
    """Decides whether `config` starts afresh or resumes an unfinished run; changes nothing.

    A run folder that holds files is resumed when its `config.json` equals
    `config` and its backup folder holds a backup (the run has not finished);
    otherwise it is replaced only with `overwrite`.

    Returns:
        True to resume, False to start afresh (with `start_run_dir`).
    """
    from kernorm.backup import has_backup

    run_dir, backup_dir = config.run_dir, config.backup_path
    saved = os.path.join(run_dir, "config.json")
    backed_up = has_backup(backup_dir)
    if overwrite:
        if _holds_files(run_dir) and not os.path.exists(saved):
            raise KernormError(f"{run_dir} is not a kernorm run folder (no config.json); refusing to overwrite it")
        if _holds_files(backup_dir) and not backed_up:
            raise KernormError(f"{backup_dir} holds files but no kernorm backup; refusing to overwrite it, "
                               f"choose another --backup-dir")
        return False
    if backed_up and os.path.isfile(saved):
        previous = TrainConfig.load(saved)
        if previous == config:
            return True
        changed = ", ".join(k for k, v in dataclasses.asdict(config).items() if getattr(previous, k) != v)
        raise KernormError(f"run folder {run_dir} holds an unfinished run with other settings ({changed}); "
                           f"resume it with --config {saved}, or pass --overwrite")
    if _holds_files(run_dir):
        raise KernormError(f"run folder {run_dir} already exists; pass --overwrite or choose another --out")
    if _holds_files(backup_dir):
        raise KernormError(f"backup folder {backup_dir} is not empty; remove it or choose another --backup-dir")
    return False


def start_run_dir(config):
    """Empties the run and backup folders that `check_run_dir` let go, and writes `config.json`."""
    for folder in (config.run_dir, config.backup_path):
        if os.path.isdir(folder):
            shutil.rmtree(folder)
    os.makedirs(config.run_dir, exist_ok=True)
    config.save(os.path.join(config.run_dir, "config.json"))


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


def agree_on_overflow(grads):
    """Makes every replica's gradients non-finite when any replica's are.

    Keras 3's LossScaleOptimizer skips a step whose loss-scaled gradients
    overflowed, but under a strategy it judges each replica's own gradients
    before they are summed: replicas would then take different branches and
    their collective ops would no longer match. Adding NaN to all gradients
    when any replica overflowed (and 0 otherwise) makes them all skip together.
    Call it in a replica context.
    """
    import tensorflow as tf

    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    overflowed = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(overflowed > 0, float("nan"), 0.0)
    return [g + tf.cast(poison, g.dtype) for g in grads]


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
        # The loss is the mean over the global batch: each replica divides its sum by the
        # global count (a last, smaller batch may split unevenly), and the optimizer sums
        # the replicas' gradients.
        global_batch = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.shape(labels)[0])
        with tf.GradientTape() as tape:
            logits = model(images, training=True)  # float32 under any precision: see build_model
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:  # the kernel regularizers' l1·Σ|w| + l2·Σw²
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)  # mixed_float16's loss scaling; the loss itself otherwise
        grads = tape.gradient(scaled, model.trainable_variables)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            grads = agree_on_overflow(grads)
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


def _epoch_data(strategy, images, labels, config, epoch, skip):
    """The training batches of epoch `epoch` after its first `skip`, split over the replicas.

    Each epoch shuffles with its own seed, seed + epoch, so its order is the
    same whether the run went straight through or resumed from a backup.
    """
    from kernorm.data import make_dataset

    dataset = make_dataset(images, labels, config.batch_size, shuffle_seed=config.seed + epoch,
                           augment_images=config.augment).skip(skip)
    return strategy.experimental_distribute_dataset(dataset.with_options(_shard_by_data()))


def _shard_by_data():
    # Workers of multi-worker training each take their share of every batch: the
    # arrays are in memory, there are no files to shard by.
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def train(config, overwrite=False, verbose=True):
    """Trains the network `config` names (the study's by default) and writes its run folder.

    The folder gets `config.json`, then after every epoch `history.csv`,
    `metrics.json` and `model.keras` (the weights after that epoch, float32
    whatever the training precision), each written whole or not at all. A
    backup after every epoch (and every `backup_every` steps) lets a killed
    run resume: rerunning the same configuration continues from the backup,
    which is deleted when the run finishes. Ctrl-C stops after keeping the
    finished epochs and the backup.

    Under multi-worker training every worker calls this with the same
    `config`; only the chief writes the run folder and the backup, the others
    write to scratch space that is removed at the end.

    Args:
        config: a `TrainConfig`.
        overwrite: replace an existing run folder, finished or not.
        verbose: print the model summary, a progress bar per epoch and test figures.

    Returns:
        The metrics dict also written to `metrics.json`.
    """
    from kernorm.data import load_mnist
    from kernorm.distribution import plan_strategy
    from kernorm.models import ARCHITECTURES

    check_choice("architecture", config.architecture, ARCHITECTURES)
    check_choice("schedule", config.schedule, SCHEDULES)
    check_choice("precision", config.precision, PRECISIONS)
    plan = plan_strategy(config.strategy, config.devices, config.cpu_replicas)
    (x_train, y_train), test = load_mnist(config.data_dir)
    if config.limit:
        x_train, y_train = x_train[:config.limit], y_train[:config.limit]
    resume = check_run_dir(config, overwrite)
    # Only the chief writes the run folder; the other workers write the same files to scratch space.
    folder = (contextlib.nullcontext(config.run_dir) if plan.chief
              else tempfile.TemporaryDirectory(prefix="kernorm-worker-"))
    with folder as out:
        return _train(config, plan, resume, out, (x_train, y_train), test, verbose)


def _train(config, plan, resume, out, train_data, test_data, verbose):
    """`train` in the folder `out`: the run folder, or a non-chief worker's scratch space."""
    import keras
    import tensorflow as tf

    from kernorm.backup import Backup
    from kernorm.data import make_dataset
    from kernorm.distribution import make_strategy
    from kernorm.models import build_model, count_trainable, dtype_policy

    strategy = make_strategy(plan)  # first: some strategies must exist before TensorFlow runs anything
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:  # for the rest of the process: TensorFlow cannot turn it off again
        tf.config.experimental.enable_op_determinism()
    (x_train, y_train), (x_test, y_test) = train_data, test_data
    architecture = dict(architecture=config.architecture, norm=config.norm, l1=config.l1, l2=config.l2,
                        dropout=config.dropout, dropout_layers=config.dropout_layers, groups=config.groups)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size < replicas:
        raise KernormError(f"--batch-size {config.batch_size} is smaller than the {replicas} replicas; "
                           f"each replica needs at least one image per step")
    # TensorFlow fails on a replica's empty share of a batch, so a last batch of fewer
    # images than replicas is left out (at most replicas - 1 images).
    leftover = len(x_train) % config.batch_size
    if leftover < replicas:
        x_train, y_train = x_train[:len(x_train) - leftover], y_train[:len(y_train) - leftover]
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    with strategy.scope():  # the model, optimizer and input pipeline the replicas share
        with dtype_policy(config.precision):
            model = build_model(**architecture, sync_bn=replicas > 1)
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate(config, steps_per_epoch),
                                         momentum=config.momentum)
        if config.precision == "mixed_float16":  # float16 gradients underflow without loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        train_steps, evaluate = make_steps(model, optimizer, strategy)
        test_ds = strategy.experimental_distribute_dataset(
            make_dataset(x_test, y_test, EVAL_BATCH_SIZE).with_options(_shard_by_data()))
    # What model.keras holds: the same network in float32, with plain BN, whatever the training set-up.
    with dtype_policy("float32"):
        saved_model = build_model(**architecture)

    # One all-reduce, which every worker must reach: all workers resume or none (a worker
    # that cannot see the backup would start afresh), and the chief clears an old run
    # below only after every worker has decided from it.
    agreed = float(strategy.reduce(tf.distribute.ReduceOp.MEAN,
                                   strategy.run(lambda: tf.constant(float(resume))), axis=None))
    if agreed not in (0.0, 1.0):
        raise KernormError(f"the workers disagree about resuming from {config.backup_path}: put the run "
                           f"folder (or --backup-dir) on storage that every worker shares")
    if plan.chief and resume:
        remove_leftovers(config.run_dir)  # writes the killed process had begun
    elif plan.chief:
        start_run_dir(config)
    backup = Backup(config.backup_path, model, optimizer,
                    write_dir=None if plan.chief else os.path.join(out, "backup"))
    if resume:
        backup.restore()
    else:
        backup.save(0, 0, tf.zeros(3), 0.0, [])

    test_steps = math.ceil(len(x_test) / EVAL_BATCH_SIZE)
    every = config.backup_every or steps_per_epoch
    params = count_trainable(model)
    writer = tf.summary.create_file_writer(os.path.join(out, "tensorboard")) if config.tensorboard else None
    if verbose:
        model.summary(expand_nested=True)
        print(f"Trainable parameters: {params:,}")
        synchronized = replicas > 1 and config.norm == "bn"
        print(f"Strategy: {plan.describe()}; {replicas} replica(s), {config.batch_size} images per step in all"
              + ("; BN statistics synchronized across replicas" if synchronized else "")
              + f"; precision {config.precision}")
        if resume:
            print(f"Resuming the unfinished run in {config.run_dir} from its backup: "
                  f"{int(backup.epoch)} epoch(s) and {int(backup.step)} step(s) done")

    history, digest, interrupted, start = backup.history, None, False, time.perf_counter()
    try:
        for epoch in range(int(backup.epoch) + 1, config.epochs + 1):
            # Zero, unless this epoch resumes from a backup taken within it.
            done, totals, seconds = int(backup.step), tf.convert_to_tensor(backup.totals), float(backup.seconds)
            if verbose:
                print(f"Epoch {epoch}/{config.epochs}")
            bar = keras.utils.Progbar(steps_per_epoch, verbose=int(verbose), stateful_metrics=["loss", "acc"])
            iterator = iter(_epoch_data(strategy, x_train, y_train, config, epoch, skip=done))
            t0 = time.perf_counter() - seconds
            while done < steps_per_epoch:
                steps = min(STEPS_PER_CALL, steps_per_epoch - done, every - done % every)
                totals += train_steps(iterator, tf.constant(steps))
                done += steps
                bar.update(done, [("loss", float(totals[0] / totals[2])), ("acc", float(totals[1] / totals[2]))])
                if done % every == 0 and done < steps_per_epoch:
                    backup.save(epoch - 1, done, totals, time.perf_counter() - t0, history)
            seconds = time.perf_counter() - t0
            row = _epoch_row(epoch, totals, evaluate(iter(test_ds), tf.constant(test_steps)),
                             float(f"{optimizer.learning_rate.numpy():.6g}"), seconds)
            history.append(row)
            digest = _save_epoch(out, model, saved_model, history, params, time.perf_counter() - start)
            backup.save(epoch, 0, tf.zeros(3), 0.0, history)
            if writer:
                with writer.as_default(step=epoch):
                    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
                        tf.summary.scalar(key, row[key])
            if verbose:
                print(f"test_loss {row['test_loss']:.4f} - test_acc {row['test_acc']:.4f} - {seconds:.1f}s")
    except KeyboardInterrupt:
        interrupted = True
    if not interrupted:
        backup.remove()
    metrics = summarize(history, params, time.perf_counter() - start, interrupted)
    write_json(os.path.join(out, "metrics.json"), metrics)
    if verbose and digest:
        print(f"Final weights digest {digest}" + ("" if plan.chief else " (the chief wrote the run folder)"))
    return metrics


def _save_epoch(out, model, saved_model, history, params, wall_time):
    """Writes the epoch's history, metrics and float32 model; returns the model's weights digest."""
    from kernorm.models import weights_digest

    saved_model.set_weights(model.get_weights())
    write_text(os.path.join(out, "history.csv"), _history_csv(history))
    write_json(os.path.join(out, "metrics.json"), summarize(history, params, wall_time, False))
    with atomic_path(os.path.join(out, "model.keras")) as tmp:
        saved_model.save(tmp)
    return weights_digest(saved_model)
