"""`kernorm sweep`: the grid, its shards, bad input, the report, and a killed sweep started again."""

import json
import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from helpers import TIMEOUT, kernorm_command, read_json, report_worker, run

from kernorm import sweep
from kernorm.cli import main
from kernorm.config import SweepConfig, TrainConfig
from kernorm.errors import KernormError

GRID = {"norm": ["bn", "gn"], "l1": [0.0, 1e-4], "lr": [0.01, 0.05]}


def test_cells_are_every_combination_with_names_from_what_they_train(tmp_path):
    cells = sweep.cells_of(SweepConfig(grid=GRID, seeds=2, out=str(tmp_path)))
    assert [cell.name for cell in cells] == ["bn", "bn-lr_0.05", "bn-l1_0.0001", "bn-l1_0.0001-lr_0.05",
                                             "gn", "gn-lr_0.05", "gn-l1_0.0001", "gn-l1_0.0001-lr_0.05"]
    run = cells[6].runs[1]
    assert (run.norm, run.l1, run.lr, run.seed, run.deterministic) == ("gn", 1e-4, 0.01, 2, True)
    assert run.run_dir == os.path.join(str(tmp_path), "runs", "gn-l1_0.0001-seed2")


def test_a_compact_cell_keeps_its_preset_and_names_it(tmp_path):
    cells = sweep.cells_of(SweepConfig(grid={"preset": ["study", "compact"], "norm": ["gn"], "groups": [2, 4]},
                                       out=str(tmp_path)))
    assert [cell.name for cell in cells] == ["gn", "gn-g4", "compact-gn-l2_0.00025", "compact-gn-g4-l2_0.00025"]
    compact = cells[3].runs[0]
    assert (compact.architecture, compact.groups, compact.epochs, compact.lr, compact.augment) == (
        "compact", 4, 15, 0.1, True)


def test_a_precision_cell_trains_in_that_dtype_policy_and_names_it(tmp_path):
    cells = sweep.cells_of(SweepConfig(grid={"precision": ["float32", "mixed_bfloat16"]}, out=str(tmp_path)))
    assert [cell.name for cell in cells] == ["bn", "bn-mixed_bfloat16"]
    assert [cell.runs[0].precision for cell in cells] == ["float32", "mixed_bfloat16"]


def test_a_zoom_cell_scales_the_preset_s_augmented_images_and_names_it(tmp_path):
    cells = sweep.cells_of(SweepConfig(grid={"preset": ["tiny"], "zoom": [0.0, 0.1, 0.2]}, out=str(tmp_path)))
    assert [cell.name for cell in cells] == [
        "tiny-bn-l2_0.0001-zoom_0", "tiny-bn-l2_0.0001", "tiny-bn-l2_0.0001-zoom_0.2"]
    assert [cell.runs[0].zoom for cell in cells] == [0.0, 0.1, 0.2]
    with pytest.raises(KernormError, match="zoom 0.1 scales the augmented images"):
        sweep.cells_of(SweepConfig(grid={"zoom": [0.1]}))  # the study's set-up does not augment


def test_two_combinations_that_train_the_same_run_are_refused():
    with pytest.raises(KernormError, match="the grid makes the cell ln twice"):
        sweep.cells_of(SweepConfig(grid={"norm": ["ln"], "groups": [1, 4]}))  # LN has one group whatever is asked


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_partition_the_grid_exactly(tmp_path, count):
    runs = sweep.seed_major(sweep.cells_of(SweepConfig(grid=GRID, seeds=3, out=str(tmp_path))))
    parts = [runs[index - 1::count] for index in range(1, count + 1)]
    dirs = [run.run_dir for part in parts for run in part]
    assert sorted(dirs) == sorted(run.run_dir for run in runs) and len(set(dirs)) == len(runs) == 24
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_runs_go_seed_by_seed():
    cells = sweep.cells_of(SweepConfig(grid={"norm": ["bn", "ln"]}, seeds=2))
    assert [(run.norm, run.seed) for run in sweep.seed_major(cells)] == [("bn", 1), ("ln", 1), ("bn", 2), ("ln", 2)]


@pytest.mark.parametrize("text, message", [
    ("3/2", "--shard 3/2: K must lie between 1 and N (2)"),
    ("0/4", "--shard 0/4: K must lie between 1 and N (4)"),
    ("two", "--shard two: write it as K/N, e.g. 2/8 for the second of 8 parts"),
])
def test_bad_shards_are_one_line(text, message):
    with pytest.raises(KernormError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.parse_shard(text)


def _grid_file(tmp_path, text):
    path = tmp_path / "grid.json"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("args, code, message", [
    (["--norm", "bn,xn"], 2, "Invalid value for '--norm': 'xn' is not one of"),
    (["--seeds", "0"], 2, "Invalid value for '--seeds': 0 is not in the range x>=1."),
    (["--norm", "gn", "--groups", "3"], 1, "Error: group norm: groups=3 does not divide 10 channels"),
    (["--shard", "3/2"], 1, "Error: --shard 3/2: K must lie between 1 and N (2)"),
    (["--validation", "300", "--limit", "300"], 1, "Error: --validation 300: hold out fewer than the 300"),
    (["--grid", "{bad json"], 1, "not a readable grid file"),
    (["--grid", '{"norms": ["bn"]}'], 1, "Error: unknown sweep axis 'norms'; choose from preset, architecture"),
    (["--grid", '{"norm": "bn"}'], 1, "Error: sweep axis 'norm' needs a non-empty list of values, not 'bn'"),
    (["--grid", '{"l1": [0, "big"]}'], 1, "Error: sweep axis 'l1': 'big' is not a float"),
    (["--grid", '{"norm": ["bn", "xn"]}'], 1, "Error: unknown norm 'xn'; choose one of bn, ln, gn, none"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, data_dir, args, code, message):
    if args[0] == "--grid":
        args = ["--grid", _grid_file(tmp_path, args[1])]
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", *args, "--data-dir", data_dir, "--out", str(out)])
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.output  # after click's usage lines, if any
    assert not out.exists()


def fake_gpus(monkeypatch, count):
    """Makes TensorFlow's device list show `count` GPUs to this process."""
    listed = sweep.tf.config.list_physical_devices
    monkeypatch.setattr(sweep.tf.config, "list_physical_devices",
                        lambda kind=None: [f"GPU:{i}" for i in range(count)] if kind == "GPU" else listed(kind))


def test_jobs_default_to_one_per_gpu_else_one_per_core(monkeypatch):
    fake_gpus(monkeypatch, 3)
    assert sweep.default_jobs() == 3
    fake_gpus(monkeypatch, 0)
    assert sweep.default_jobs() == len(os.sched_getaffinity(0))


def test_each_worker_sees_its_own_gpu_with_memory_growth(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [sweep.worker_env(worker, 2)["CUDA_VISIBLE_DEVICES"] for worker in range(5)] == ["0", "1", "0", "1", "0"]
    assert sweep.worker_env(0, 2)["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert sweep.worker_env(3, 0) == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6, 2")  # the user's choice of GPUs: each worker gets one of them
    assert [sweep.worker_env(worker, 2)["CUDA_VISIBLE_DEVICES"] for worker in range(3)] == ["6", "2", "6"]


def test_runs_train_in_processes_of_their_own_each_on_its_worker_s_gpu(tmp_path, monkeypatch):
    """`run_all(jobs=2)` on two GPUs: a new process per run, each seeing one GPU of the user's, with memory growth."""
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # inherited by the processes unless each sets its own
    monkeypatch.setattr(sweep, "train_or_resume", report_worker)  # what each process sees, not a training run
    runs = [TrainConfig(seed=seed, out=str(tmp_path / f"run{seed}")) for seed in (1, 2, 3)]
    assert sweep.run_all(runs, jobs=2, verbose=False) == []
    seen = [read_json(config.run_dir, "worker.json") for config in runs]
    assert len({worker["pid"] for worker in seen} - {os.getpid()}) == 3
    assert {worker["CUDA_VISIBLE_DEVICES"] for worker in seen} == {"5", "7"}
    assert {worker["TF_FORCE_GPU_ALLOW_GROWTH"] for worker in seen} == {"true"}


@pytest.mark.slow
def test_a_killed_sweep_started_again_finishes_without_training_finished_runs_again(tmp_path, data_dir):
    out = tmp_path / "sweep"
    command = kernorm_command("sweep", "--norm", "bn,ln", "--seeds", "2", "--epochs", "2", "--limit", "600",
                              "--validation", "100", "--jobs", "1", "--data-dir", data_dir, "--out", out)
    first = out / "runs" / "bn-seed1"
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not (first / "test_predictions.npy").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and its training process, mid-grid
    process.wait()
    finished = {path: os.stat(path / "model.keras").st_mtime_ns
                for path in (out / "runs").iterdir() if (path / "test_predictions.npy").exists()}
    assert first in finished and len(finished) < 4

    # Started again without --data-dir, the sweep reads the folder its sweep.json recorded.
    environment = {key: value for key, value in os.environ.items() if key != "KERNORM_DATA_DIR"}
    again = subprocess.run([arg for arg in command if arg not in ("--data-dir", data_dir)], capture_output=True,
                           text=True, timeout=TIMEOUT, env=environment)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(finished)} of 4 runs already finished; training {4 - len(finished)}" in again.stdout
    # Into a pipe: one plain line per trained run, no escape codes or redraws.
    assert "\x1b" not in again.stdout and "\r" not in again.stdout
    assert len([line for line in again.stdout.splitlines() if line.startswith("[")]) == 4 - len(finished)
    for path, stamp in finished.items():
        assert os.stat(path / "model.keras").st_mtime_ns == stamp
    results = read_json(out, "results.json")
    assert {name: cell["n"] for name, cell in results["cells"].items()} == {"bn": 2, "ln": 2}
    assert results["compared"] == "chosen_test_acc"
    assert [(row["a"], row["b"], row["seeds"]) for row in results["comparisons"]] == [("bn", "ln", [1, 2])]
    for name in ("results.md", "findings.md", "seeds.png", "curves.png", "sweep.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "sweep.json").read_text())["grid"] == {"norm": ["bn", "ln"]}
    assert json.loads((out / "sweep.json").read_text())["data_dir"] == data_dir


@pytest.mark.slow
def test_kill_stops_the_sweep_and_its_training_process_as_ctrl_c_does(tmp_path, data_dir):
    out = tmp_path / "sweep"
    command = kernorm_command("sweep", "--seeds", "1", "--epochs", "200", "--limit", "600", "--jobs", "1",
                              "--data-dir", data_dir, "--out", out)
    run_dir = out / "runs" / "bn-seed1"
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "history.csv").exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # to the sweep alone, not to its training process
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, stderr[-2000:]
    assert "Interrupted; finished runs are kept" in stderr
    while time.monotonic() < deadline:  # the training process ends too, its run kept unfinished
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the sweep went on after it was killed")
    assert not (run_dir / "test_predictions.npy").exists()
    assert len((run_dir / "history.csv").read_text().splitlines()) < 201


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_others(tmp_path, data_dir):
    out = tmp_path / "sweep"
    result = run(kernorm_command("sweep", "--norm", "none", "--lr", "0.01,1000", "--seeds", "1", "--epochs", "1",
                                 "--limit", "1000", "--data-dir", data_dir, "--out", out))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "Error: 1 run(s) failed; the report holds the finished ones; first: none-lr_1000-seed1: training diverged")
    assert read_json(out, "results.json")["cells"]["none"]["n"] == 1
    assert read_json(out, "results.json")["cells"]["none-lr_1000"]["n"] == 0


def test_batch_size_and_label_smoothing_cells_train_them_and_name_them(tmp_path):
    cells = sweep.cells_of(SweepConfig(grid={"preset": ["tiny"], "batch_size": [128, 64],
                                             "label_smoothing": [0, 0.1]}, out=str(tmp_path)))
    assert [cell.name for cell in cells] == ["tiny-bn-l2_0.0001", "tiny-bn-l2_0.0001-ls_0.1",
                                             "tiny-bn-l2_0.0001-batch_64", "tiny-bn-l2_0.0001-batch_64-ls_0.1"]
    assert [(cell.runs[0].batch_size, cell.runs[0].label_smoothing) for cell in cells] == [
        (128, 0), (128, 0.1), (64, 0), (64, 0.1)]
