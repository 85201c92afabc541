"""The `kernorm` command line: parses options, calls the library, prints."""

import dataclasses
import errno
import multiprocessing
import os
import signal
import sys

import click
from click.core import ParameterSource

from kernorm.config import (
    ARCHITECTURES,
    DEFAULT_GROUPS,
    DROPOUT_LAYERS,
    MAX_DIGITS,
    NORMS,
    PRECISIONS,
    PRESETS,
    QUANTIZATIONS,
    RUNTIMES,
    SCHEDULES,
    STRATEGIES,
    ExportConfig,
    ReproduceConfig,
    SweepConfig,
    TrainConfig,
    describe_preset,
    read_grid,
)
from kernorm.console import VERBOSE_ENV, quiet_native_logs
from kernorm.errors import KernormError

# Errors of a full, read-only or forbidden disk: the user can fix them, so one line says which file.
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


class _Group(click.Group):
    """Turns a user's error into click's one-line `Error: ...` and exit status 1.

    KernormError is one; so are a disk that cannot be written and an error
    TensorFlow raises, whose first line is kept.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KernormError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.errno not in DISK_ERRORS:
                raise
            raise click.ClickException(f"cannot write {e.filename or 'a file'}: {e.strerror}; what was written "
                                       f"before is kept; free space, or choose a writable --out") from None
        except Exception as e:
            if not type(e).__module__.startswith("tensorflow"):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise click.ClickException(f"TensorFlow: {first} (run with --verbose for its log)") from None
        finally:
            # What the command printed comes before its error line, also where stdout is a buffered file or pipe.
            sys.stdout.flush()


@click.group(cls=_Group)
@click.version_option(package_name="kernorm")
@click.option("--verbose", is_flag=True, envvar=VERBOSE_ENV,
              help=f"Show TensorFlow's and LiteRT's own logs too [env: {VERBOSE_ENV}].")
def main(verbose):
    """Normalization and regularization for a tiny CNN: train, compare, export."""
    if not verbose:
        quiet_native_logs()
    signal.signal(signal.SIGTERM, _stop_as_ctrl_c)


def _stop_as_ctrl_c(signum, frame):
    # `kill PID` reaches this process alone, where Ctrl-C reaches the terminal's whole process group: pass
    # SIGINT on to the training processes a sweep started, so that each keeps its finished epochs and ends
    # rather than training on without the sweep, and stop here as Ctrl-C does.
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGINT)
    raise KeyboardInterrupt


def _data_dir(recorded):
    """The --data-dir option every command that reads MNIST shares; `recorded` names the folder it falls back on
    (see `kernorm.data.find_data_dir`)."""
    return click.option("--data-dir", type=click.Path(), envvar="KERNORM_DATA_DIR",
                        help=f"Folder with the four MNIST IDX files [env: KERNORM_DATA_DIR]; default: {recorded}, "
                             f"else Keras's download (needs internet).")


_LIMIT = click.option("--limit", type=click.IntRange(min=1), default=None, help="Train on the first N images only.")
_JOBS = click.option("--jobs", type=click.IntRange(min=1), default=None,
                     help="Training processes at once [default: one per GPU, else one per core].")
_VALIDATION = click.option("--validation", type=click.IntRange(min=0), default=0, show_default=True,
                           help="Hold out the last N training images (after --limit), never trained on; each epoch "
                                "is evaluated on them and the epoch is chosen by them, never by a test figure.")

_DEFAULTS = TrainConfig()


def _device_list(ctx, param, value):
    """`--devices "GPU:0, GPU:1"` -> ["GPU:0", "GPU:1"]; None when not given."""
    names = [name.strip() for name in (value or "").split(",") if name.strip()]
    return names or None


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Start from a run's config.json; options given here override it.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="study", show_default=True,
              help="Training recipe to start from; options given here override it. Defaults shown are the "
                   "study's; " + "; ".join(f"{name}: {describe_preset(name)}" for name in PRESETS if name != "study")
                   + ".")
@click.option("--architecture", type=click.Choice(ARCHITECTURES), default=_DEFAULTS.architecture,
              show_default=True, help="Network: study (the study's), or compact, small or tiny "
                                      "(depthwise-separable: 4,490, 1,936 and 996 parameters).")
@click.option("--norm", type=click.Choice(NORMS), default=_DEFAULTS.norm, show_default=True)
@click.option("--groups", type=click.IntRange(min=1), default=_DEFAULTS.groups, show_default=True,
              help="Channel groups for gn.")
@click.option("--l1", type=click.FloatRange(min=0), default=_DEFAULTS.l1, show_default=True,
              help="L1 coefficient on conv and dense kernels.")
@click.option("--l2", type=click.FloatRange(min=0), default=_DEFAULTS.l2, show_default=True,
              help="L2 coefficient on conv and dense kernels.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="Dropout rate.")
@click.option("--dropout-layers", type=click.Choice(DROPOUT_LAYERS), default=_DEFAULTS.dropout_layers,
              show_default=True, help="Dropout after each conv block (last) or after every conv layer (all).")
@click.option("--epochs", type=click.IntRange(min=1), default=_DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULTS.batch_size, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.lr, show_default=True)
@click.option("--momentum", type=click.FloatRange(0, 1), default=_DEFAULTS.momentum, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=_DEFAULTS.label_smoothing,
              show_default=True, help="Train on targets smoothed by this much towards uniform.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_DEFAULTS.schedule, show_default=True,
              help="Learning rate: constant, or one-cycle (warm-up to --lr, cosine down to 0).")
@click.option("--augment/--no-augment", default=_DEFAULTS.augment, show_default=True,
              help="Rotate and shift training images at random (never test images, never the model).")
@click.option("--zoom", type=click.FloatRange(0, 1, max_open=True), default=_DEFAULTS.zoom, show_default=True,
              help="With --augment, also scale training images by up to 1 ± this fraction.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@_data_dir("the folder the run folder recorded, when it resumes")
@_LIMIT
@_VALIDATION
@click.option("--out", default=None,
              help="Run folder [default: runs/[<architecture>-]<norm>[-l1_X][-l2_X]-seed<seed>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder (only one kernorm made).")
@click.option("--deterministic", is_flag=True, help="TensorFlow op determinism: identical reruns.")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard scalars into the run folder.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=_DEFAULTS.strategy, show_default=True,
              help="tf.distribute strategy: auto (all GPUs, else the CPU), default (one device), mirrored "
                   "(replicas on local devices), multi-worker (machines named by TF_CONFIG).")
@click.option("--devices", callback=_device_list,
              help="Comma-separated devices for auto or mirrored, e.g. GPU:0,GPU:1.")
@click.option("--cpu-replicas", type=click.IntRange(min=1), default=None,
              help="mirrored: split the CPU into N replicas (CPU:0..N-1).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_DEFAULTS.precision, show_default=True,
              help="Keras dtype policy; logits, loss and the saved model stay float32.")
@click.option("--backup-dir", default=None,
              help="Backup folder for resuming a killed run [default: <run folder>/backup].")
@click.option("--backup-every", type=click.IntRange(min=1), default=None,
              help="Back up every N steps within an epoch too [default: at each epoch's end only].")
@click.pass_context
def train(ctx, config_file, preset, overwrite, **options):
    """Train a network on MNIST and write a run folder."""
    from kernorm.train import train as run_training

    if config_file and ctx.get_parameter_source("preset") is not ParameterSource.DEFAULT:
        raise click.UsageError("--config and --preset both give a starting configuration; pass one")
    config = TrainConfig.load(config_file) if config_file else PRESETS[preset]
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    if given.get("augment") is False and "zoom" not in given:
        given["zoom"] = 0.0  # the starting recipe's scaling is part of the augmentation turned off
    config = dataclasses.replace(config, **given)
    metrics = run_training(config, overwrite=overwrite)
    if metrics["interrupted"]:
        click.echo(f"Interrupted after {metrics['epochs_completed']} epoch(s); kept in {config.run_dir}; "
                   f"run the same command again to resume", err=True)
        ctx.exit(130)
    click.echo(f"final test acc {metrics['final_test_acc']:.4f}, " + (
        f"at the epoch chosen on validation {metrics['chosen_test_acc']:.4f} (epoch {metrics['chosen_epoch']})"
        if config.validation else f"best {metrics['best_test_acc']:.4f} (epoch {metrics['best_epoch']})")
        + f"; run folder {config.run_dir}")


class _ListOf(click.ParamType):
    """A comma-separated list, each item converted by `item_type`: "bn,gn" -> ["bn", "gn"]."""

    def __init__(self, item_type):
        self.item_type = item_type
        self.name = f"{item_type.name} list"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        return [self.item_type.convert(item.strip(), param, ctx) for item in value.split(",")]


def _axis(name, item_type, what):
    return click.option(f"--{name}", type=_ListOf(item_type), default=None,
                        help=f"Comma-separated {what} [default: the preset's].")


@main.command()
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False),
              help='JSON file of axis -> values, e.g. {"norm": ["bn", "gn"], "l1": [0, 1e-4]}; options given '
                   "here replace its axes.")
@click.option("--preset", type=_ListOf(click.Choice(list(PRESETS))), default=None,
              help="Comma-separated presets every cell starts from [default: study].")
@_axis("architecture", click.Choice(ARCHITECTURES), "networks")
@_axis("norm", click.Choice(NORMS), "norms")
@_axis("groups", click.IntRange(min=1), "channel group counts of gn")
@_axis("l1", click.FloatRange(min=0), "L1 coefficients")
@_axis("l2", click.FloatRange(min=0), "L2 coefficients")
@_axis("dropout", click.FloatRange(0, 1, max_open=True), "dropout rates")
@_axis("lr", click.FloatRange(min=0, min_open=True), "learning rates")
@_axis("batch-size", click.IntRange(min=1), "batch sizes")
@_axis("label-smoothing", click.FloatRange(0, 1, max_open=True), "label smoothings")
@_axis("zoom", click.FloatRange(0, 1, max_open=True), "zooms of augmented images")
@_axis("precision", click.Choice(PRECISIONS), "dtype policies")
@click.option("--seeds", type=click.IntRange(min=1), default=SweepConfig.seeds, show_default=True,
              help="Seeds per cell: 1 to N.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs of every run [default: the preset's].")
@_VALIDATION
@_data_dir("the folder OUT/sweep.json recorded")
@_LIMIT
@click.option("--out", type=click.Path(file_okay=False), default=SweepConfig.out, show_default=True,
              help="Sweep folder; runs go to OUT/runs/<cell>-seed<N>.")
@_JOBS
@click.option("--shard", default="1/1", show_default=True,
              help="K/N: run only the K-th of N disjoint parts of the grid (for a scheduler's job array).")
@click.option("--report-only", is_flag=True, help="Train nothing; write the report of the finished runs.")
@click.pass_context
def sweep(ctx, grid_file, seeds, epochs, validation, data_dir, limit, out, jobs, shard, report_only, **axes):
    """Train a grid of configurations over seeds, and report them with confidence intervals and paired tests.

    Every cell x seed is a run folder of `kernorm train`: a finished run is reused, an unfinished one
    resumes, so the same command can be stopped and started again. The report (results.md, findings.md,
    seeds.png, curves.png) is written into OUT from every run that has finished.
    """
    from kernorm.sweep import parse_shard
    from kernorm.sweep import sweep as run_sweep

    grid = read_grid(grid_file) if grid_file else {}
    grid.update({axis: values for axis, values in axes.items() if values is not None})
    config = SweepConfig(grid=grid, seeds=seeds, epochs=epochs, validation=validation, limit=limit,
                         data_dir=data_dir, out=out)
    try:
        run_sweep(config, jobs=jobs, shard=parse_shard(shard), report_only=report_only)
    except KeyboardInterrupt:
        click.echo(f"Interrupted; finished runs are kept in {out}: run the same command to go on", err=True)
        ctx.exit(130)
    click.echo(f"Report written to {out}: results.md, findings.md, seeds.png, curves.png")


_RUN = click.Path(exists=True, file_okay=False)


@main.command()
@click.option("--epochs", type=click.IntRange(min=1), default=ReproduceConfig.epochs, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=ReproduceConfig.seeds, show_default=True,
              help="Seeds 1 to N of every experiment; with 2 or more, a statistical report in OUT/statistics.")
@_VALIDATION
@click.option("--out", type=click.Path(file_okay=False), default=ReproduceConfig.out, show_default=True,
              help="Report folder; the run folders go to OUT/runs/<experiment>-seed<N>.")
@_data_dir("the folder OUT/reproduce.json recorded")
@_LIMIT
@_JOBS
@click.pass_context
def reproduce(ctx, jobs, **options):
    """Run the study's three experiments (BN + L1 + L2, LN + L2, GN + L1) and write its report.

    Finished run folders already in OUT/runs with the same configuration are reused. With --seeds 2 or
    more, OUT/statistics compares the experiments over their seeds.
    """
    from kernorm.reports import results_markdown
    from kernorm.study import reproduce as run_study

    config = ReproduceConfig(**options)
    try:
        rows = run_study(config, jobs=jobs)
    except KeyboardInterrupt:
        click.echo(f"Interrupted; finished runs are kept in {config.out}: run the same command to go on", err=True)
        ctx.exit(130)
    click.echo(results_markdown(rows) + f"\nReport written to {config.out}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=_RUN)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Figure file (.png, .pdf, .svg).")
def plot(runs, out):
    """Plot the learning curves of one or more run folders into one figure."""
    from kernorm import reports
    from kernorm.rundir import load_run

    reports.save_figure(reports.draw_curves([load_run(run) for run in runs]), out)
    click.echo(f"Curves written to {out}")


@main.command()
@click.argument("run", type=_RUN)
@click.option("--count", type=click.IntRange(min=1), default=20, show_default=True, help="Images to show.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Figure file (.png, .pdf, .svg).")
@_data_dir("the folder the run recorded")
def gallery(run, count, out, data_dir):
    """Show the first COUNT test images that RUN's model gets wrong, captioned."""
    from kernorm import reports
    from kernorm.data import load_mnist
    from kernorm.models import load_model
    from kernorm.rundir import load_run

    loaded = load_run(run)
    _, (x_test, y_test) = load_mnist(data_dir, loaded.config.data_dir)
    probs = reports.predict_probs(load_model(loaded.model_file), x_test)
    title = f"{loaded.label}, after epoch {loaded.metrics['epochs_completed']}"
    reports.save_figure(reports.draw_gallery(x_test, y_test, probs, count, title=title), out)
    click.echo(f"Gallery written to {out}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=_RUN)
@_data_dir("the folder the first run recorded")
def compare(runs, data_dir):
    """Print a markdown table of the runs' parameters, accuracies and speed.

    Two runs are also compared image by image: McNemar's exact test on their final models' test predictions.
    """
    from kernorm import findings, reports
    from kernorm.data import load_mnist
    from kernorm.rundir import load_run

    loaded = [load_run(run) for run in runs]
    click.echo(reports.results_markdown([reports.summarize_run(run) for run in loaded]), nl=False)
    if len(loaded) == 2:
        _, (_, y_test) = load_mnist(data_dir, loaded[0].config.data_dir)
        click.echo("\n" + findings.mcnemar_line(*loaded, y_test))


@main.command()
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Images in the batch [default: 4].")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="Channels per image [default: 4].")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Image height and width [default: 2].")
@click.option("--groups", type=click.IntRange(min=1), default=DEFAULT_GROUPS, show_default=True,
              help="Channel groups for GN.")
@click.option("--seed", type=int, default=None, help="Seed of the drawn integers [default: 1].")
@click.option("--values", "values_file", type=click.Path(dir_okay=False),
              help='JSON {"activations": [image][channel][row][col], "weights": [out][in]} instead of drawn values.')
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv"]), default="text", show_default=True)
def normcalc(batch, channels, size, groups, seed, values_file, fmt):
    """Work BN, LN and GN out number by number on a small batch, for two successive layers.

    Every number is also computed by kernorm's Keras layers; a difference above 1e-5 is an error.
    """
    from kernorm import normcalc as calc

    drawing = {k: v for k, v in dict(batch=batch, channels=channels, size=size, seed=seed).items() if v is not None}
    if values_file:
        if drawing:
            raise KernormError(f"{', '.join('--' + k for k in drawing)} cannot go with --values: "
                               f"the file fixes the values and their shape")
        activations, weights = calc.read_values(values_file)
    else:
        activations, weights = calc.draw_values(**drawing)
    try:
        calculations = calc.normcalc(activations, weights, groups)
    except calc.CrossCheckError as e:
        raise click.ClickException(str(e)) from None
    click.echo(calc.FORMATTERS[fmt](calculations, activations, weights), nl=False)


_EXPORT_DEFAULTS = {field.name: field.default for field in dataclasses.fields(ExportConfig)}


@main.command()
@click.argument("model", metavar="RUN_OR_MODEL")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS + ("all",)), default=_EXPORT_DEFAULTS["quantize"],
              show_default=True, help="Which TFLite model(s) to write.")
@click.option("--out", default=None, help="Export folder [default: export/ beside the .keras file].")
@click.option("--max-drop", type=click.FloatRange(min=0), default=_EXPORT_DEFAULTS["max_drop"], show_default=True,
              help="Largest accepted test-accuracy drop from Keras to TFLite, in points.")
@click.option("--calibration", type=click.IntRange(min=1), default=_EXPORT_DEFAULTS["calibration"],
              show_default=True, help="Training images that calibrate the int8 model.")
@click.option("--micro", is_flag=True,
              help="Also run the int8 and float32 models under TensorFlow Lite Micro (it must match LiteRT's "
                   "accuracy), measure their arena, and write each as C++ source and header [pip install "
                   "'kernorm[micro]'].")
@click.option("--device", default=None,
              help="With --micro, also build each model into firmware with TensorFlow Lite Micro's sources for "
                   "this device (host, cortex-m4, cortex-m4-cmsis-nn), run it on the test images (a Cortex-M "
                   "under qemu-system-arm) and record its flash, RAM and instructions; every class must equal "
                   "TFLM's Python interpreter's.")
@click.option("--device-images", type=click.IntRange(min=1), default=_EXPORT_DEFAULTS["device_images"],
              show_default=True, help="Test images the firmware classifies on the device.")
@click.option("--tflm-dir", type=click.Path(file_okay=False), envvar="KERNORM_TFLM_DIR",
              help="TensorFlow Lite Micro's source folder (tflite-micro, with its Makefile's downloads) that "
                   "--device builds from [env: KERNORM_TFLM_DIR].")
@_data_dir("the folder the run folder recorded")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder (only one kernorm made).")
def export(overwrite, **options):
    """Convert a trained model to TFLite and check it on the test set with LiteRT.

    RUN_OR_MODEL is a run folder of `kernorm train` or a .keras file. With --micro, also check it with
    TensorFlow Lite Micro and write the C++ a microcontroller program compiles in.
    """
    from kernorm.export import export as run_export

    config = ExportConfig(**options)
    run_export(config, overwrite=overwrite)
    click.echo(f"all checks passed; export folder {config.out_dir}")


@main.command()
@click.argument("model", metavar="MODEL.tflite", type=click.Path(dir_okay=False))
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the most probable digits to print per image.")
@click.option("--digits", is_flag=True,
              help="Read each picture as a number, left to right, and print it with each digit's probability.")
@click.option("--max-digits", type=click.IntRange(min=1), default=MAX_DIGITS, show_default=True,
              help="With --digits: the most digits a picture may hold; more is an error for that picture.")
@click.option("--debug-dir", type=click.Path(file_okay=False),
              help="Write each 28x28 crop the model saw into DIR, as <image name>[-<digit>].png.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=RUNTIMES[0], show_default=True,
              help="Interpreter: LiteRT, or TensorFlow Lite Micro's (micro; pip install 'kernorm[micro]').")
@click.pass_context
def predict(ctx, model, images, top, digits, max_digits, debug_dir, runtime):
    """Classify digit images (PNG, JPEG, or 28x28 .npy) with an exported TFLite model.

    Pictures are fitted into 28x28 as MNIST's digits were: the strokes found
    apart from noise, shadows and paper lines, made white on black, cropped,
    scaled to 20 px, centred.

    One line per image, in order: its prediction, or "Error: IMAGE: reason"
    (on stderr) for an image that cannot be read, and the next image follows.
    Exit status: 0 when every image was classified; 1 when one was not, or
    when the model cannot be loaded (one line, before any image); 2 for a
    wrong option.
    """
    import os

    from kernorm.images import load_digit, load_digits, save_crops
    from kernorm.runtime import top_k

    if not digits and ctx.get_parameter_source("max_digits") is not ParameterSource.DEFAULT:
        raise click.UsageError("--max-digits limits --digits; add --digits to read numbers")
    if runtime == "micro":
        from kernorm.micro import load_tflite  # TFLM is an optional extra, imported only when asked for
    else:
        from kernorm.runtime import load_tflite
    tflite = load_tflite(model)
    failed = False
    for path in images:
        try:
            crops = load_digits(path, tflite.predict, max_digits) if digits else load_digit(path)[None]
            probabilities = tflite.predict(crops)
        except KernormError as e:
            named = str(e) if str(e).startswith(f"{path}:") else f"{path}: {e}"
            click.echo(f"Error: {named}", err=True)
            failed = True
            continue
        if debug_dir:
            save_crops(debug_dir, os.path.splitext(os.path.basename(path))[0], crops)
        if digits:
            number = "".join(str(p.argmax()) for p in probabilities)
            click.echo(f"{path}: {number} (" + ", ".join(f"{p.argmax()} {p.max():.3f}" for p in probabilities) + ")")
        else:
            click.echo(f"{path}: " + ", ".join(f"{digit} ({p:.3f})" for digit, p in top_k(probabilities[0], top)))
    if failed:
        ctx.exit(1)
