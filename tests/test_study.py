import dataclasses
import json
import os
import shutil

import pytest
from helpers import read_json
from PIL import Image

from kernorm.config import ReproduceConfig, TrainConfig
from kernorm.rundir import why_not_reusable
from kernorm.study import EXPERIMENTS, reproduce

FIGURES = {"curves.png": (1200, 800),
           **{f"misclassified-{n}.png": (1000, 980) for n in ("bn", "ln", "gn")},
           **{f"confusion-{n}.png": (700, 640) for n in ("bn", "ln", "gn")}}

pytestmark = pytest.mark.slow  # every test reads the session's `kernorm reproduce` run (tiny_study)


def test_reproduce_writes_every_file(tiny_study, data_dir):
    out, output = tiny_study
    assert sorted(os.listdir(out)) == sorted([*FIGURES, ".kernorm", "reproduce.json", "results.json", "results.md",
                                              "runs", "statistics"])
    runs = [f"{name}-seed{seed}" for name in ("bn-l1-l2", "gn-l1", "ln-l2") for seed in (1, 2)]
    assert sorted(os.listdir(os.path.join(out, "runs"))) == runs
    for name, size in FIGURES.items():
        with Image.open(os.path.join(out, name)) as image:
            image.verify()
        with Image.open(os.path.join(out, name)) as image:
            assert (image.format, image.size) == ("PNG", size), name
    assert read_json(out, "reproduce.json") == {"epochs": 2, "seeds": 2, "validation": 0, "out": out,
                                                "data_dir": data_dir, "limit": 512}
    assert "| LN + L2 | 4,700 |" in output and f"Report written to {out}" in output


def test_experiments_are_the_study_s_with_translated_coefficients(tiny_study):
    out, _ = tiny_study
    for seed in (1, 2):
        configs = {e.name: TrainConfig.load(os.path.join(out, "runs", f"{e.name}-seed{seed}", "config.json"))
                   for e in EXPERIMENTS}
        assert {name: (c.norm, c.l1, c.l2) for name, c in configs.items()} == {
            "bn-l1-l2": ("bn", 1e-4, 5e-6), "ln-l2": ("ln", 0.0, 5e-6), "gn-l1": ("gn", 1e-4, 0.0)}
        for c in configs.values():
            assert (c.epochs, c.limit, c.seed, c.lr, c.momentum, c.batch_size, c.groups) == (
                2, 512, seed, 0.01, 0.9, 128, 2)


def test_results_match_the_run_folders(tiny_study):
    out, _ = tiny_study
    results = read_json(out, "results.json")
    assert [row["experiment"] for row in results["experiments"]] == ["BN + L1 + L2", "LN + L2", "GN + L1"]
    markdown = open(os.path.join(out, "results.md")).read()
    for experiment, row in zip(EXPERIMENTS, results["experiments"]):
        metrics = read_json(out, row["run"], "metrics.json")
        assert row["run"] == os.path.join("runs", f"{experiment.name}-seed1")
        for key in ("params", "best_train_acc", "best_test_acc", "best_epoch", "final_test_acc",
                    "seconds_per_epoch", "epochs_completed"):
            assert row[key] == metrics[key], key
        assert row["study"] == experiment.study
        assert (f"| {row['experiment']} | 4,700 | {100 * metrics['best_train_acc']:.2f} | "
                f"{100 * metrics['best_test_acc']:.2f} ({metrics['best_epoch']}) | "
                f"{100 * metrics['final_test_acc']:.2f} |") in markdown
    assert "99.42 / 99.21" in markdown and "99.54 / 99.26" in markdown and "99.33 / 99.23" in markdown


def test_the_seeds_are_compared_in_a_statistical_report(tiny_study):
    out, _ = tiny_study
    results = read_json(out, "statistics", "results.json")
    assert {name: cell["n"] for name, cell in results["cells"].items()} == {"bn-l1-l2": 2, "ln-l2": 2, "gn-l1": 2}
    ln = results["cells"]["ln-l2"]["final_test_acc"]["values"]
    assert ln == [read_json(out, "runs", f"ln-l2-seed{seed}", "metrics.json")["final_test_acc"] for seed in (1, 2)]
    assert [(row["a"], row["b"]) for row in results["comparisons"]] == [
        ("bn-l1-l2", "ln-l2"), ("bn-l1-l2", "gn-l1"), ("ln-l2", "gn-l1")]
    assert "with 2 seeds" in open(os.path.join(out, "statistics", "findings.md")).read()
    assert "[findings](statistics/findings.md)" in open(os.path.join(out, "results.md")).read()


def test_a_second_run_reuses_finished_folders_and_retrains_a_crashed_one(tiny_study, tmp_path):
    out = str(tmp_path / "moved")  # a moved report stays reusable: locations are not part of a run's identity
    shutil.copytree(tiny_study[0], out)
    config = dataclasses.replace(ReproduceConfig(**read_json(out, "reproduce.json")), out=out)
    models = {name: os.path.join(out, "runs", name, "model.keras") for name in os.listdir(os.path.join(out, "runs"))}
    stamps = {name: os.stat(path).st_mtime_ns for name, path in models.items()}
    # One run was killed after its first epoch: its metrics.json says 1 of 2 epochs.
    crashed = os.path.join(out, "runs", "gn-l1-seed2", "metrics.json")
    metrics = read_json(crashed)
    with open(crashed, "w") as f:
        json.dump({**metrics, "epochs_completed": 1}, f)
    os.remove(os.path.join(out, "curves.png"))

    reproduce(config, jobs=1, verbose=False)
    assert [name for name in models if os.stat(models[name]).st_mtime_ns != stamps[name]] == ["gn-l1-seed2"]
    assert read_json(crashed)["epochs_completed"] == 2
    assert os.path.isfile(os.path.join(out, "curves.png"))


@pytest.mark.parametrize("change, reason", [
    (dict(epochs=3), "stopped after 2 of 3 epochs"),
    (dict(l2=1e-3), "different l2"),
    (dict(data_dir="/elsewhere/mnist"), None),  # where the data lies is not part of a run's identity
])
def test_why_a_run_is_or_is_not_reused(tiny_study, change, reason):
    out, _ = tiny_study
    config = TrainConfig.load(os.path.join(out, "runs", "ln-l2-seed1", "config.json"))
    config = dataclasses.replace(config, **change)
    got = why_not_reusable(config)
    assert got == reason if reason is None else reason in got
    assert "no finished run" in why_not_reusable(dataclasses.replace(config, out=os.path.join(out, "nothing")))
