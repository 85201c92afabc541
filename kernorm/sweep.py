"""`kernorm sweep`: a grid of training configurations, each over several seeds, and its statistical report.

Every cell × seed is an ordinary run folder that `kernorm.train.train` writes,
at `<out>/runs/<cell>-seed<N>`. A finished run is reused and an unfinished
one resumes, so the same command can be stopped and started again at any
time. `--jobs` runs that many training processes at once on one machine;
`--shard K/N` runs only every N-th run from the K-th, so that a job array of
any scheduler spreads one sweep over machines that share the folder. The
report (`kernorm.findings`) is written from whatever runs have finished.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import queue
import time

import keras
import tensorflow as tf

from kernorm import findings, folders, rundir
from kernorm.config import DEFAULT_GROUPS, PRESETS, SweepConfig
from kernorm.data import find_data_dir, load_mnist, recorded_data_dir, split_validation
from kernorm.errors import KernormError
from kernorm.models import build_model
from kernorm.train import train

SWEEP_FILE = "sweep.json"
RUNS = "runs"
# How a sweep folder that an earlier kernorm wrote, before folders were marked, is known.
EARLIER_SWEEP = folders.saved_config(SWEEP_FILE, SweepConfig)


def parse_shard(text):
    """`"K/N"` -> `(K, N)`, with 1 <= K <= N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise KernormError(f"--shard {text}: write it as K/N, e.g. 2/8 for the second of 8 parts") from None
    if not 1 <= index <= count:
        raise KernormError(f"--shard {text}: K must lie between 1 and N ({count})")
    return index, count


def cell_name(preset, config):
    """A cell's folder name from its preset and what it trains:
    `[<preset>-][<architecture>-]<norm>[-g<groups>][-l1_X][-l2_X][-dropout_X][-lr_X][-batch_X][-ls_X][-zoom_X]
    [-<precision>]`, naming the preset unless it is the study's, and the architecture, groups, lr, batch size,
    label smoothing, zoom and precision where they differ from it."""
    parts = [] if preset == "study" else [preset]
    if config.architecture != PRESETS[preset].architecture:
        parts.append(config.architecture)
    parts.append(config.norm)
    if config.norm == "gn" and config.groups != DEFAULT_GROUPS:
        parts.append(f"g{config.groups}")
    parts += [f"{key}_{value:g}" for key, value in (("l1", config.l1), ("l2", config.l2), ("dropout", config.dropout))
              if value]
    parts += [f"{short}_{getattr(config, key):g}" for key, short in (
        ("lr", "lr"), ("batch_size", "batch"), ("label_smoothing", "ls"), ("zoom", "zoom"))
        if getattr(config, key) != getattr(PRESETS[preset], key)]
    if config.precision != PRESETS[preset].precision:
        parts.append(config.precision)
    return "-".join(parts)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of a sweep: its name, its place in the grid and its seeds' `TrainConfig`s."""

    name: str
    coordinates: dict
    runs: tuple


def cells_of(sweep):
    """The sweep's cells, in grid order, each with one `TrainConfig` per seed."""
    cells = []
    for coordinates, config in sweep.cells():
        name = cell_name(coordinates["preset"], config)
        runs = tuple(dataclasses.replace(config, seed=seed, out=os.path.join(sweep.out, RUNS, f"{name}-seed{seed}"))
                     for seed in range(1, sweep.seeds + 1))
        cells.append(Cell(name, coordinates, runs))
    names = [cell.name for cell in cells]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise KernormError(f"the grid makes the cell {twice[0]} twice: two of its combinations train the same "
                           f"run (a norm without groups, or a value equal to the preset's); list each once")
    return cells


def seed_major(cells):
    """All runs of the cells, every cell's seed 1 first, then seed 2, ...: a part-finished sweep has
    the same seeds in every cell, which the paired comparisons need."""
    return [cell.runs[seed] for seed in range(len(cells[0].runs)) for cell in cells]


def check_cells(cells, data_dir, recorded=None):
    """Raises a `KernormError` for a cell that cannot train, before anything is written:
    a norm whose groups do not divide a layer's channels, a validation split too large, MNIST
    missing (`data_dir` and `recorded` as `kernorm.data.load_mnist` takes them)."""
    # Building the models starts TensorFlow's GPUs in this process: let it take the memory it needs only,
    # not TensorFlow's default of nearly all, which the training processes need.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    for cell in cells:
        build_model(**cell.runs[0].network())
        keras.backend.clear_session()
    (x_train, y_train), _ = load_mnist(data_dir, recorded)
    config = cells[0].runs[0]
    if config.limit:
        x_train, y_train = x_train[:config.limit], y_train[:config.limit]
    split_validation(x_train, y_train, config.validation)


def _start_worker(threads, env):
    # Set before TensorFlow starts: each of --jobs processes takes its share of the cores, and its
    # environment (`worker_env`: its GPU) before TensorFlow first looks for devices.
    os.environ.update(env)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def train_or_resume(config):
    """Trains one run of a sweep: resumes its unfinished run, or starts it afresh; returns its metrics."""
    try:
        resume = rundir.check_run_dir(config, overwrite=False)
    except KernormError:  # a run of another grid in the folder: this grid's run replaces it
        resume = False
    return train(config, overwrite=not resume, verbose=False)


def gpu_count():
    """The GPUs TensorFlow sees in this process."""
    return len(tf.config.list_physical_devices("GPU"))


def default_jobs():
    """Training processes that run at once by default: one per GPU where TensorFlow sees GPUs, else
    one per core, each with one thread. The study's small convolutions keep several threads of one
    process from filling the cores, which one process per core does (docs/sweeps.md measures it)."""
    return gpu_count() or len(os.sched_getaffinity(0))


def worker_env(worker, gpus):
    """The environment variables that training process number `worker` (0, 1, ...) starts with.

    With `gpus` GPUs visible, worker i sees only GPU i mod `gpus` (`CUDA_VISIBLE_DEVICES`: the i-th
    entry of this process's own list where it has one), as its GPU:0, and allocates its memory as it
    grows (`TF_FORCE_GPU_ALLOW_GROWTH`), rather than TensorFlow's default of nearly all of it.

    Returns:
        A dict of variable names and values; empty without GPUs.
    """
    if not gpus:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(gpus)]
    return {"CUDA_VISIBLE_DEVICES": devices[worker % gpus].strip(), "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def _train_in_new_process(config, slots, threads):
    """`train_or_resume(config)` in a process started for this run alone, as `kernorm train` would be:
    nothing of one run's TensorFlow state (its seeds, op determinism) reaches the next. The process
    takes a free worker's slot from `slots`, a queue of `worker_env` dicts, and gives it back at its end."""
    env = slots.get()
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_start_worker, initargs=(threads, env)) as pool:
            return pool.submit(train_or_resume, config).result()
    finally:
        slots.put(env)


def run_all(runs, jobs=None, verbose=True):
    """Trains every run of `runs` (`TrainConfig`s) that has not finished, `jobs` processes at a time
    (default `default_jobs()`), each in a process of its own.

    Finished runs are reused. Prints one line per run and the time left. A run
    that fails with a user's error (it diverged, its folder is in use) does
    not stop the others. Ctrl-C stops every run after its finished epochs and
    raises KeyboardInterrupt.

    Returns:
        One line per failed run, naming it and the error.
    """
    jobs = jobs or default_jobs()
    todo = [config for config in runs if rundir.why_not_reusable(config) is not None]
    if verbose:
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; training {len(todo)} "
              f"in {min(jobs, max(1, len(todo)))} process(es)", flush=True)
    failures = []
    if not todo:
        return failures
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    slots = queue.SimpleQueue()
    gpus = gpu_count()
    for worker in range(jobs):
        slots.put(worker_env(worker, gpus))
    start, done = time.perf_counter(), 0
    # `jobs` threads, each waiting on one training process at a time.
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(_train_in_new_process, config, slots, threads): config for config in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                config, done = futures[future], done + 1
                try:
                    metrics = future.result()
                except KernormError as e:
                    failures.append(f"{os.path.basename(config.run_dir)}: {e}")
                    line = f"[{done}/{len(todo)}] {failures[-1]}"
                else:
                    if metrics["interrupted"]:
                        raise KeyboardInterrupt
                    line = _progress_line(config, metrics, done, len(todo), time.perf_counter() - start)
                if verbose:
                    print(line, flush=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return failures


def raise_failures(failures):
    """Raises one `KernormError` for the runs that failed, once the report of the others is written."""
    if failures:
        raise KernormError(f"{len(failures)} run(s) failed; the report holds the finished ones; "
                           f"first: {failures[0]}")


def _progress_line(config, metrics, done, total, elapsed):
    chosen = (f", chosen on validation {100 * metrics['chosen_test_acc']:.2f} % (epoch {metrics['chosen_epoch']})"
              if metrics["chosen_epoch"] else "")
    left = elapsed / done * (total - done)
    return (f"[{done}/{total}] {os.path.basename(config.run_dir)}: final test {100 * metrics['final_test_acc']:.2f} %"
            f"{chosen}; about {left / 60:.0f} min left")


def sweep(config, jobs=None, shard=(1, 1), report_only=False, verbose=True):
    """Runs this process's share of a sweep and writes the report of every finished run.

    Args:
        config: a `kernorm.config.SweepConfig`.
        jobs: training processes at once; default `default_jobs()`.
        shard: `(K, N)`: run only every N-th run of the grid, from the K-th.
        report_only: train nothing, only write the report.
        verbose: print progress.

    Returns:
        The report's `results.json` content.
    """
    # The folder the sweep was started on, unless told otherwise; every run reads, and sweep.json records, it.
    recorded = recorded_data_dir(os.path.join(config.out, SWEEP_FILE))
    config = dataclasses.replace(config, data_dir=find_data_dir(config.data_dir, recorded))
    cells = cells_of(config.check())
    if not report_only:
        check_cells(cells, config.data_dir, recorded)
    folders.claim(config.out, "sweep", EARLIER_SWEEP)  # the report too goes only into a sweep folder
    if not report_only:
        config.save(os.path.join(config.out, SWEEP_FILE))
        index, count = shard
        failures = run_all(seed_major(cells)[index - 1::count], jobs, verbose)
    pairs = [(a, b) for i, a in enumerate(cells) for b in cells[i + 1:]
             if sum(a.coordinates[k] != b.coordinates[k] for k in a.coordinates) == 1]
    report = findings.write_report(config.out, {cell.name: cell.runs for cell in cells},
                                   [(a.name, b.name) for a, b in pairs], title="Sweep")
    if not report_only:
        raise_failures(failures)
    return report

