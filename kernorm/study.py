"""`kernorm reproduce`: the study's three experiments, trained (or reused) and reported.

Each experiment and seed is an ordinary run folder written by
`kernorm.train.train`, at `<out>/runs/<name>-seed<N>`, trained as `kernorm
sweep` trains its runs. A run folder that already holds the finished run of
the same configuration is reused, so an interrupted or crashed reproduction
picks up where it stopped. The study's report (curves, galleries, confusion
matrices, results table) is written from the seed-1 runs at the end; with
several seeds, `kernorm.findings` adds the statistical report in
`<out>/statistics`.
"""

import dataclasses
import os

from kernorm import findings, folders, reports
from kernorm.config import ReproduceConfig
from kernorm.data import find_data_dir, load_mnist, recorded_data_dir
from kernorm.files import write_json, write_text
from kernorm.models import load_model
from kernorm.rundir import load_run
from kernorm.sweep import raise_failures, run_all


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One of the study's experiments and the figures the study reported for it (fractions, not percent)."""

    name: str
    norm: str
    l1: float
    l2: float
    study: dict


# The study's weight decay 1e-5 adds 1e-5·w to the gradient, which is the gradient of 5e-6·Σw²:
# an L2 coefficient of 5e-6. Its L1 of 1e-4 is a loss term 1e-4·Σ|w|, the same as ours.
EXPERIMENTS = (
    Experiment("bn-l1-l2", "bn", l1=1e-4, l2=5e-6, study={
        "best_train_acc": 0.9942, "best_test_acc": 0.9921,
        "notebook_best_test_acc": 0.9930, "notebook_final_test_acc": 0.9930}),
    Experiment("ln-l2", "ln", l1=0.0, l2=5e-6, study={
        "best_train_acc": 0.9954, "best_test_acc": 0.9926,
        "notebook_best_test_acc": 0.9928, "notebook_final_test_acc": 0.9922}),
    Experiment("gn-l1", "gn", l1=1e-4, l2=0.0, study={
        "best_train_acc": 0.9933, "best_test_acc": 0.9923,
        "notebook_best_test_acc": 0.9915, "notebook_final_test_acc": 0.9915}),
)
GALLERY_COUNT = 20
CONFIG_FILE = "reproduce.json"
STATISTICS = "statistics"
# How a report folder that an earlier kernorm wrote, before folders were marked, is known.
EARLIER_REPORT = folders.saved_config(CONFIG_FILE, ReproduceConfig)


def reproduce(config, jobs=None, verbose=True):
    """Runs the study's three experiments over `config.seeds` seeds and writes the report into `config.out`.

    Writes `reproduce.json`, `runs/<experiment>-seed<N>/` (run folders), and
    from the seed-1 runs `curves.png`, `misclassified-<norm>.png`,
    `confusion-<norm>.png`, `results.md` and `results.json`; with two or more
    seeds also `statistics/` (`kernorm.findings`: every experiment over its
    seeds, and each pair compared). Finished run folders of the same
    configuration are reused. Ctrl-C keeps the finished epochs and raises
    KeyboardInterrupt.

    Args:
        config: a `kernorm.config.ReproduceConfig`.
        jobs: training processes at once (see `kernorm.sweep.run_all`).
        verbose: print what is trained or reused.

    Returns:
        The rows of `results.json`.
    """
    # The folder the study was started on, unless told otherwise; every run reads, and reproduce.json records, it.
    recorded = recorded_data_dir(os.path.join(config.out, CONFIG_FILE))
    config = dataclasses.replace(config, data_dir=find_data_dir(config.data_dir, recorded))
    load_mnist(config.data_dir, recorded)  # missing or damaged MNIST: one line now, before anything is written
    folders.claim(config.out, "report", EARLIER_REPORT)
    write_json(os.path.join(config.out, CONFIG_FILE), dataclasses.asdict(config))
    runs = [config.train_config(e, seed) for seed in range(1, config.seeds + 1) for e in EXPERIMENTS]
    failures = run_all(runs, jobs, verbose)
    raise_failures(failures)  # the study's report needs every run
    if config.seeds > 1:
        cells = {e.name: [config.train_config(e, seed) for seed in range(1, config.seeds + 1)] for e in EXPERIMENTS}
        pairs = [(a.name, b.name) for i, a in enumerate(EXPERIMENTS) for b in EXPERIMENTS[i + 1:]]
        findings.write_report(os.path.join(config.out, STATISTICS), cells, pairs, title="The study over seeds")
    return write_report(config)


def write_report(config):
    """Writes the figures and results of the seed-1 run folders into `config.out`; returns the rows."""
    runs = [load_run(config.train_config(e).run_dir) for e in EXPERIMENTS]
    _, (x_test, y_test) = load_mnist(config.data_dir)
    reports.save_figure(reports.draw_curves(runs), os.path.join(config.out, "curves.png"))
    rows = []
    for experiment, run in zip(EXPERIMENTS, runs):
        probs = reports.predict_probs(load_model(run.model_file), x_test)
        title = f"{run.label}, after epoch {run.metrics['epochs_completed']}"
        reports.save_figure(reports.draw_gallery(x_test, y_test, probs, GALLERY_COUNT, title=title),
                            os.path.join(config.out, f"misclassified-{experiment.norm}.png"))
        matrix = reports.confusion_matrix(y_test, probs.argmax(-1))
        reports.save_figure(reports.draw_confusion(matrix, title=title),
                            os.path.join(config.out, f"confusion-{experiment.norm}.png"))
        row = reports.summarize_run(run)
        row["run"] = os.path.relpath(run.path, config.out)
        rows.append({**row, "study": experiment.study})
    write_json(os.path.join(config.out, "results.json"), {"config": dataclasses.asdict(config), "experiments": rows})
    write_text(os.path.join(config.out, "results.md"), results_page(config, rows))
    return rows


def results_page(config, rows):
    """`results.md`: the findings table with the study's figures beside ours, and what the report holds."""
    data = f"the first {config.limit:,} training images" if config.limit else "all 60,000 training images"
    if config.validation:
        data += f", the last {config.validation:,} of them held out for validation"
    best = ("\"best\" is not reported: with a validation split no test figure picks an epoch."
            if config.validation else "\"best\" is the best test epoch, picked on the test set as the study did.")
    seeds = ([f"Seeds 1 to {config.seeds} of every experiment, with confidence intervals and paired comparisons: "
              f"[results]({STATISTICS}/results.md), [findings]({STATISTICS}/findings.md).", ""]
             if config.seeds > 1 else [])
    galleries = ", ".join(f"[{e.norm}](misclassified-{e.norm}.png)" for e in EXPERIMENTS)
    confusions = ", ".join(f"[{e.norm}](confusion-{e.norm}.png)" for e in EXPERIMENTS)
    return "\n".join([
        "# The study, reproduced by kernorm",
        "",
        f"Three experiments, {config.epochs} epochs each on {data} (test: all 10,000), with the study's",
        "set-up: SGD lr 0.01, momentum 0.9, batch 128, seed 1. The study's weight decay 1e-5 is our L2",
        f"coefficient 5e-6, its L1 1e-4 our L1 1e-4. Accuracies in percent, of seed 1; {best}",
        "The study's figures: its README's run, and its notebook's last run.",
        "",
        reports.results_markdown(rows),
        *seeds,
        "![Learning curves](curves.png)",
        "",
        f"Misclassified test images (model after the last epoch): {galleries}. Confusion matrices: {confusions}.",
        "",
    ])
