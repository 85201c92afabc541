"""`kernorm train`: the training loop, which writes a run folder (see `kernorm.rundir`).

The loop is a custom step under a `tf.distribute` strategy rather than
`model.fit`, because Keras 3's `fit` does not run under
`MultiWorkerMirroredStrategy`; one loop then serves a CPU, GPUs and several
machines alike.
"""

import contextlib
import dataclasses
import math
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from kernorm import rundir
from kernorm.backup import Backup
from kernorm.console import interactive, progress_bar
from kernorm.data import find_data_dir, load_mnist, make_dataset, recorded_data_dir, split_validation
from kernorm.distribution import make_strategy, plan_strategy
from kernorm.errors import KernormError
from kernorm.files import remove_leftovers
from kernorm.models import build_model, count_trainable, dtype_policy, weights_digest
from kernorm.steps import learning_rate, make_steps

# Training steps run per call into the compiled graph: fewer Python round trips.
STEPS_PER_CALL = 50
EVAL_BATCH_SIZE = 1000
TENSORBOARD_SCALARS = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr")


def train(config, overwrite=False, verbose=True):
    """Trains the network `config` names (the study's by default) and writes its run folder.

    The folder gets `config.json`, then after every epoch `history.csv`,
    `metrics.json` and `model.keras`, and the per-image test predictions of
    the final model (and of the epoch chosen on the validation images) (see
    `kernorm.rundir`). MNIST comes from the folder `kernorm.data.find_data_dir`
    picks (the run folder's recorded one after `config.data_dir` and
    `KERNORM_DATA_DIR`), which `config.json` records. A backup after
    every epoch (and every `backup_every` steps) lets a killed run resume:
    rerunning the same configuration continues from the backup, which is
    deleted when the run finishes. Ctrl-C stops after keeping the finished
    epochs and the backup.

    Under multi-worker training every worker calls this with the same
    `config`; only the chief writes the run folder and the backup, the others
    write to scratch space that is removed at the end.

    Args:
        config: a `kernorm.config.TrainConfig`.
        overwrite: replace an existing run folder, finished or not, only one kernorm made (`kernorm.folders`).
        verbose: print the model summary, a progress bar per epoch and test figures; where
            standard output is not a terminal, one plain line per epoch instead of the bar.

    Returns:
        The metrics dict also written to `metrics.json`.
    """
    config.check()
    plan = plan_strategy(config.strategy, config.devices, config.cpu_replicas)
    # A resumed run reads the folder it was trained on unless told otherwise; the folder read is recorded.
    recorded = recorded_data_dir(os.path.join(config.run_dir, rundir.CONFIG))
    config = dataclasses.replace(config, data_dir=find_data_dir(config.data_dir, recorded))
    (x_train, y_train), test = load_mnist(config.data_dir, recorded)
    if config.limit:
        x_train, y_train = x_train[:config.limit], y_train[:config.limit]
    train_data, validation = split_validation(x_train, y_train, config.validation)
    with contextlib.ExitStack() as stack:
        # Only the chief writes the run folder, locked against other processes; the other
        # workers write the same files to scratch space.
        if plan.chief:
            rundir.check_locations(config)
            stack.enter_context(rundir.locked(config.run_dir))
            if not rundir.inside(config.backup_path, config.run_dir):
                stack.enter_context(rundir.locked(config.backup_path))
            out = config.run_dir
        else:
            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="kernorm-worker-"))
        resume = rundir.check_run_dir(config, overwrite)
        return _train(config, plan, resume, out, train_data, {"test": test, "val": validation}, verbose)


@dataclasses.dataclass
class _Setup:
    """What the loop trains: the strategy, its training images, the model and its float32 copy,
    the optimizer and the compiled steps."""

    strategy: object
    train_data: tuple
    model: object
    saved_model: object  # what model.keras holds: the same network in float32 with plain BN
    optimizer: object
    train_steps: object
    evaluate: object
    steps_per_epoch: int


def _drop_uneven_tail(config, replicas, x, y):
    # TensorFlow fails on a replica's empty share of a batch, so a last batch of fewer
    # images than replicas is left out (at most replicas - 1 images).
    if config.batch_size < replicas:
        raise KernormError(f"--batch-size {config.batch_size} is smaller than the {replicas} replicas; "
                           f"each replica needs at least one image per step")
    leftover = len(x) % config.batch_size
    return (x[:len(x) - leftover], y[:len(y) - leftover]) if leftover < replicas else (x, y)


def _set_up(config, plan, train_data):
    """Seeds the process and builds everything the loop needs to train on `train_data`."""
    strategy = make_strategy(plan)  # first: some strategies must exist before TensorFlow runs anything
    train_data = _drop_uneven_tail(config, strategy.num_replicas_in_sync, *train_data)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:  # for the rest of the process: TensorFlow cannot turn it off again
        tf.config.experimental.enable_op_determinism()
    steps_per_epoch = math.ceil(len(train_data[0]) / config.batch_size)
    with strategy.scope():  # the model and optimizer the replicas share
        with dtype_policy(config.precision):
            model = build_model(**config.network(), sync_bn=strategy.num_replicas_in_sync > 1)
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate(config, steps_per_epoch),
                                         momentum=config.momentum)
        if config.precision == "mixed_float16":  # float16 gradients underflow without loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        train_steps, evaluate = make_steps(model, optimizer, strategy, config.label_smoothing)
    with dtype_policy("float32"):
        saved_model = build_model(**config.network())
    return _Setup(strategy, train_data, model, saved_model, optimizer, train_steps, evaluate, steps_per_epoch)


def _agree_on_resuming(strategy, resume, config):
    # One all-reduce, which every worker must reach: all workers resume or none (a worker
    # that cannot see the backup would start afresh), and the chief clears an old run
    # only after every worker has decided from it.
    agreed = float(strategy.reduce(tf.distribute.ReduceOp.MEAN,
                                   strategy.run(lambda: tf.constant(float(resume))), axis=None))
    if agreed not in (0.0, 1.0):
        raise KernormError(f"the workers disagree about resuming from {config.backup_path}: put the run "
                           f"folder (or --backup-dir) on storage that every worker shares")


def _distribute(strategy, dataset):
    # Workers of multi-worker training each take their share of every batch: the
    # arrays are in memory, there are no files to shard by.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _means(prefix, totals):
    """`{prefix_loss, prefix_acc}` from the summed `[loss, correct, count]` of a pass over a set."""
    loss, correct, count = (float(v) for v in totals)
    return {f"{prefix}_loss": loss / count, f"{prefix}_acc": correct / count}


def _evaluation(strategy, images, labels):
    """A function that returns the summed `[loss, correct, count]` of the model over `(images, labels)`."""
    dataset = _distribute(strategy, make_dataset(images, labels, EVAL_BATCH_SIZE))
    steps = tf.constant(math.ceil(len(images) / EVAL_BATCH_SIZE))
    return lambda evaluate: evaluate(iter(dataset), steps)


def _predicted_classes(model, images):
    logits = model.predict(images[..., None].astype(np.float32), batch_size=EVAL_BATCH_SIZE, verbose=0)
    return logits.argmax(-1).astype(np.uint8)


def _print_start(config, plan, setup, params, resume, backup):
    setup.model.summary(expand_nested=True)
    replicas = setup.strategy.num_replicas_in_sync
    synchronized = replicas > 1 and config.norm == "bn"
    print(f"Trainable parameters: {params:,}")
    print(f"Strategy: {plan.describe()}; {replicas} replica(s), {config.batch_size} images per step in all"
          + ("; BN statistics synchronized across replicas" if synchronized else "")
          + f"; precision {config.precision}")
    if resume:
        print(f"Resuming the unfinished run in {config.run_dir} from its backup: "
              f"{int(backup.epoch)} epoch(s) and {int(backup.step)} step(s) done")


def _train(config, plan, resume, out, train_data, eval_data, verbose):
    """`train` in the folder `out`: the run folder, or a non-chief worker's scratch space.

    `eval_data` maps "test" and "val" to `(images, labels)`, or "val" to None.
    """
    setup = _set_up(config, plan, train_data)
    strategy = setup.strategy
    evaluations = {name: _evaluation(strategy, *data) for name, data in eval_data.items() if data is not None}
    x_test = eval_data["test"][0]

    _agree_on_resuming(strategy, resume, config)
    if plan.chief and resume:
        remove_leftovers(config.run_dir)  # writes the killed process had begun
        config.save(os.path.join(config.run_dir, rundir.CONFIG))  # its locations may have moved
    elif plan.chief:
        rundir.start_run_dir(config)
    backup = Backup(config.backup_path, setup.model, setup.optimizer,
                    write_dir=None if plan.chief else os.path.join(out, "backup"))
    if resume:
        backup.restore()
    else:
        backup.save(0, 0, tf.zeros(3), 0.0, [])

    params = count_trainable(setup.model)
    writer = tf.summary.create_file_writer(os.path.join(out, rundir.TENSORBOARD)) if config.tensorboard else None
    if verbose:
        _print_start(config, plan, setup, params, resume, backup)
    every = config.backup_every or setup.steps_per_epoch
    history, interrupted, start = backup.history, False, time.perf_counter()
    live = verbose and interactive()  # a bar redrawn on a terminal; into a file, one line per epoch
    try:
        for epoch in range(int(backup.epoch) + 1, config.epochs + 1):
            totals, seconds = _train_epoch(config, setup, backup, epoch, every, live, history)
            lr = float(f"{setup.optimizer.learning_rate.numpy():.6g}")
            row = {"epoch": epoch, **_means("train", totals)}
            for name, evaluation in evaluations.items():
                row.update(_means(name, evaluation(setup.evaluate)))
            row.update(lr=lr, seconds=seconds)
            history.append(row)
            setup.saved_model.set_weights(setup.model.get_weights())
            rundir.write_epoch(out, history, rundir.summarize(history, params, time.perf_counter() - start, False),
                               setup.saved_model)
            if rundir.chosen_row(history) is row:
                rundir.write_predictions(out, rundir.CHOSEN_PREDICTIONS, _predicted_classes(setup.saved_model, x_test))
            backup.save(epoch, 0, tf.zeros(3), 0.0, history)
            if writer:
                with writer.as_default(step=epoch):
                    for key in TENSORBOARD_SCALARS:
                        if key in row:
                            tf.summary.scalar(key, row[key])
            if verbose:
                trained = "" if live else (f"Epoch {epoch}/{config.epochs} - loss {row['train_loss']:.4f} - "
                                           f"acc {row['train_acc']:.4f} - ")
                held_out = f"val_acc {row['val_acc']:.4f} - " if "val_acc" in row else ""
                print(f"{trained}{held_out}test_loss {row['test_loss']:.4f} - test_acc {row['test_acc']:.4f} - "
                      f"{seconds:.1f}s", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    if not interrupted:
        setup.saved_model.set_weights(setup.model.get_weights())  # a resumed run may train no epoch here
        rundir.write_predictions(out, rundir.PREDICTIONS, _predicted_classes(setup.saved_model, x_test))
    metrics = rundir.summarize(history, params, time.perf_counter() - start, interrupted)
    rundir.write_metrics(out, metrics)
    if not interrupted:  # last: a run killed before this resumes from its backup and finishes again
        backup.remove()
    if verbose and history:
        print(f"Final weights digest {weights_digest(setup.saved_model)}"
              + ("" if plan.chief else " (the chief wrote the run folder)"))
    return metrics


def _train_epoch(config, setup, backup, epoch, every, show_bar, history):
    """Trains epoch `epoch` from where the backup stands; returns its `[loss, correct, count]` sums and seconds.

    Each epoch shuffles and augments from its own streams, `epoch_seeds(seed,
    epoch)`, so its order is the same whether the run went straight through or
    resumed from a backup. A backup is taken every `every` steps within the epoch. `show_bar`: show
    the epoch's title and progress bar.
    """
    # Zero, unless this epoch resumes from a backup taken within it.
    done, totals = int(backup.step), tf.convert_to_tensor(backup.totals)
    dataset = make_dataset(*setup.train_data, config.batch_size, seed=config.seed, epoch=epoch,
                           augment_images=config.augment, zoom=config.zoom).skip(done)
    iterator = iter(_distribute(setup.strategy, dataset))
    bar = progress_bar(setup.steps_per_epoch, f"Epoch {epoch}/{config.epochs}", show_bar,
                       stateful_metrics=["loss", "acc"])
    t0 = time.perf_counter() - float(backup.seconds)
    while done < setup.steps_per_epoch:
        steps = min(STEPS_PER_CALL, setup.steps_per_epoch - done, every - done % every)
        totals += setup.train_steps(iterator, tf.constant(steps))
        done += steps
        if not math.isfinite(float(totals[0])):
            lr = float(setup.optimizer.learning_rate.numpy())
            raise KernormError(f"training diverged: the loss became {float(totals[0])} in epoch {epoch} by step "
                               f"{done} (learning rate {lr:.6g}); the {epoch - 1} finished epoch(s) are kept in "
                               f"{config.run_dir}; train again with a lower --lr and --overwrite")
        bar.update(done, [("loss", float(totals[0] / totals[2])), ("acc", float(totals[1] / totals[2]))])
        if done % every == 0 and done < setup.steps_per_epoch:
            backup.save(epoch - 1, done, totals, time.perf_counter() - t0, history)
    return totals, time.perf_counter() - t0
