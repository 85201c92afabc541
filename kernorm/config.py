"""Every command's configuration, the training presets and every list of choices.

This module imports neither TensorFlow nor Keras, so the command line can
build its options from it and `kernorm predict` can start without them. Each
configuration is a dataclass that is saved as JSON beside what it made.
"""

import dataclasses
import itertools
import json
import os

from kernorm.errors import KernormError, check_choice
from kernorm.files import write_json

# Lists of choices. `kernorm.norms.NORMS` and `kernorm.models.ARCHITECTURES` hold one
# entry for each name here.
NORMS = ("bn", "ln", "gn", "none")
ARCHITECTURES = ("study", "compact", "small", "tiny")
SCHEDULES = ("constant", "onecycle")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")
# The quantizations `kernorm export --micro` also writes for TensorFlow Lite Micro, which has no
# float16 or hybrid (int8-weight, float-activation) kernels.
MICRO_QUANTIZATIONS = ("float32", "int8")
# Interpreters `kernorm predict` runs a model with: LiteRT, or TensorFlow Lite Micro (`kernorm.micro`).
RUNTIMES = ("litert", "micro")
# "last": one Dropout after each conv block; "all": one after every conv layer.
DROPOUT_LAYERS = ("last", "all")
# Channel groups of group normalization, the study's GN(2, C).
DEFAULT_GROUPS = 2
# The most digits `kernorm predict --digits` reads in a picture unless --max-digits says otherwise.
MAX_DIGITS = 10


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run; saved as `config.json` in the run folder.

    Defaults are the study's set-up: its network, SGD with constant lr 0.01 and
    momentum 0.9, batch 128, 25 epochs, seed 1, no augmentation. `PRESETS`
    holds other recipes. `batch_size` is the global batch: each step splits it
    over the strategy's replicas. With `schedule="onecycle"`, `lr` is the peak
    learning rate (see `kernorm.steps.learning_rate`). `augment` rotates and
    shifts the training images in the input pipeline (`kernorm.data.augment`),
    and with `zoom` also scales them by up to 1 ± zoom; the model never holds
    it. `validation` holds out the last N of the training images (after
    `limit`), never trained on: each epoch is then evaluated on
    them too, and the epoch is chosen by them, never by a test figure.
    `label_smoothing` trains on targets of 1 − ε + ε/10 for the true class and
    ε/10 for the others (ε = label_smoothing); evaluation losses stay plain.
    """

    architecture: str = "study"
    norm: str = "bn"
    groups: int = DEFAULT_GROUPS
    l1: float = 0.0
    l2: float = 0.0
    dropout: float | None = None
    dropout_layers: str = "last"
    epochs: int = 25
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    label_smoothing: float = 0.0
    schedule: str = "constant"
    augment: bool = False
    zoom: float = 0.0
    seed: int = 1
    data_dir: str | None = None
    limit: int | None = None
    validation: int = 0
    out: str | None = None
    deterministic: bool = False
    tensorboard: bool = False
    strategy: str = "auto"
    devices: list[str] | None = None
    cpu_replicas: int | None = None
    precision: str = "float32"
    backup_dir: str | None = None
    backup_every: int | None = None

    def check(self):
        """Raises a `KernormError` naming the first field that holds no valid choice."""
        for what, value, choices in (("architecture", self.architecture, ARCHITECTURES),
                                     ("norm", self.norm, NORMS), ("schedule", self.schedule, SCHEDULES),
                                     ("precision", self.precision, PRECISIONS),
                                     ("strategy", self.strategy, STRATEGIES),
                                     ("dropout placement", self.dropout_layers, DROPOUT_LAYERS)):
            check_choice(what, value, choices)
        if not 0 <= self.zoom < 1:
            raise KernormError(f"zoom {self.zoom:g}: choose a fraction from 0 up to (not including) 1")
        if self.zoom and not self.augment:
            raise KernormError(f"zoom {self.zoom:g} scales the augmented images: add --augment or leave --zoom out")
        return self

    def network(self):
        """The keyword arguments of `kernorm.models.build_model` that build this run's network."""
        return dict(architecture=self.architecture, norm=self.norm, groups=self.groups, l1=self.l1, l2=self.l2,
                    dropout=self.dropout, dropout_layers=self.dropout_layers)

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

    def identity(self):
        """What was trained, as a dict: every field but `LOCATION_FIELDS`.

        Two configurations with the same identity train the same run, so one
        may resume or reuse the other's run folder.
        """
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in LOCATION_FIELDS}

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


# Fields that say where files are and how progress is kept, not what is trained: a run
# may move its data, folders or backup cadence and stay the same run.
LOCATION_FIELDS = ("data_dir", "out", "tensorboard", "backup_dir", "backup_every")

# Training recipes by name; command-line options override their fields. The smaller networks take the
# compact recipe for twice the epochs, with the L2 their validation sweep chose; tiny also scales its
# augmented images by up to ±10 %, a lever its validation search kept with its network (docs/accuracy.md).
_COMPACT = TrainConfig(architecture="compact", l2=2.5e-4, epochs=15, lr=0.1, schedule="onecycle", augment=True)
PRESETS = {
    "study": TrainConfig(),
    "compact": _COMPACT,
    "small": dataclasses.replace(_COMPACT, architecture="small", epochs=30),
    "tiny": dataclasses.replace(_COMPACT, architecture="tiny", epochs=30, l2=1e-4, zoom=0.1),
}


def describe_preset(name):
    """The fields in which preset `name` differs from the study's set-up, e.g. "epochs 15, lr 0.1"."""
    preset, study = dataclasses.asdict(PRESETS[name]), dataclasses.asdict(PRESETS["study"])
    changed = [f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
               for key, value in preset.items() if value != study[key]]
    return ", ".join(changed) or "the study's set-up"


@dataclasses.dataclass
class ExportConfig:
    """Everything that defines an export; saved as `config.json` in the export folder.

    Attributes:
        model: a run folder (its `model.keras` is used) or a `.keras` file.
        quantize: one of `QUANTIZATIONS`, or "all" of them.
        out: the export folder; default `export/` beside the `.keras` file.
        max_drop: the largest accepted accuracy drop, TFLite below Keras, in points.
        calibration: training images that calibrate the int8 model's ranges.
        data_dir: folder of the MNIST IDX files, as for `kernorm train`.
        micro: also check the int8 and float32 models under TensorFlow Lite Micro and write
            each as C++ source (`kernorm.micro`).
        device: with `micro`, also build each of those models into firmware for this device (a name in
            `kernorm.firmware.TARGETS`) and run it on the first `device_images` test images there.
        device_images: test images the firmware classifies.
        tflm_dir: TensorFlow Lite Micro's source folder the firmware is built from; default
            `$KERNORM_TFLM_DIR`.
    """

    model: str
    quantize: str = "int8"
    out: str | None = None
    max_drop: float = 0.3
    calibration: int = 500
    data_dir: str | None = None
    micro: bool = False
    device: str | None = None
    device_images: int = 1000
    tflm_dir: str | None = None

    @property
    def model_file(self):
        """The `.keras` file: `model` itself, or `model.keras` in the run folder `model`."""
        return os.path.join(self.model, "model.keras") if os.path.isdir(self.model) else self.model

    @property
    def out_dir(self):
        return self.out or os.path.join(os.path.dirname(self.model_file), "export")

    @property
    def quantizations(self):
        if self.quantize == "all":
            return QUANTIZATIONS
        check_choice("quantization", self.quantize, QUANTIZATIONS + ("all",))
        return (self.quantize,)

    @property
    def micro_quantizations(self):
        """The quantizations also checked under TFLM and written as C++: none without `micro`."""
        if not self.micro:
            return ()
        if self.quantize not in MICRO_QUANTIZATIONS + ("all",):
            raise KernormError(f"--micro with --quantize {self.quantize}: TensorFlow Lite Micro runs the "
                               f"{' and '.join(MICRO_QUANTIZATIONS)} models; pass --quantize "
                               f"{', '.join(MICRO_QUANTIZATIONS)} or all")
        return tuple(q for q in self.quantizations if q in MICRO_QUANTIZATIONS)

    def save(self, path):
        write_json(path, dataclasses.asdict(self))


@dataclasses.dataclass
class ReproduceConfig:
    """`kernorm reproduce`'s configuration; saved as `reproduce.json` in the report folder.

    The training set-up is the study's (`TrainConfig`'s defaults: SGD lr 0.01,
    momentum 0.9, batch 128), with op determinism on so that a reproduction
    repeats exactly. The study trained seed 1; `seeds` trains seeds 1 to N of
    each experiment, and `validation` holds out that many training images
    (see `TrainConfig`).
    """

    epochs: int = 25
    seeds: int = 1
    validation: int = 0
    out: str = os.path.join("reports", "study")
    data_dir: str | None = None
    limit: int | None = None

    def train_config(self, experiment, seed=1):
        """The `TrainConfig` of one of the study's experiments and a seed, its run folder inside `out`."""
        return TrainConfig(norm=experiment.norm, l1=experiment.l1, l2=experiment.l2, epochs=self.epochs,
                           seed=seed, data_dir=self.data_dir, limit=self.limit, validation=self.validation,
                           deterministic=True, out=os.path.join(self.out, "runs", f"{experiment.name}-seed{seed}"))


# The `TrainConfig` fields a sweep's grid may vary, besides the preset it starts from, and
# the types their values take (a dropout may also be null: none).
SWEEP_AXES = {"architecture": str, "norm": str, "groups": int, "l1": float, "l2": float, "dropout": float,
              "lr": float, "batch_size": int, "label_smoothing": float, "zoom": float, "precision": str}


def read_grid(path):
    """Reads a grid file: a JSON object of axis -> list of values, e.g. `{"norm": ["bn", "gn"], "l1": [0, 1e-4]}`."""
    try:
        with open(path) as f:
            grid = json.load(f)
    except (OSError, ValueError) as e:
        raise KernormError(f"{path}: not a readable grid file ({e}); write a JSON object such as "
                           f'{{"norm": ["bn", "gn"], "l1": [0, 0.0001]}}') from None
    if not isinstance(grid, dict):
        raise KernormError(f"{path}: a grid file holds a JSON object of axis -> list of values, not "
                           f"{type(grid).__name__}")
    return grid


@dataclasses.dataclass
class SweepConfig:
    """`kernorm sweep`'s configuration: a grid of training configurations, each over several seeds.

    Saved as `sweep.json` in the sweep folder.

    Attributes:
        grid: the values of each axis, `{"preset": [...], "norm": [...], ...}`:
            "preset" (a key of `PRESETS`, default the study's) and any of
            `SWEEP_AXES`. Every combination is a cell; an axis left out keeps
            the preset's value.
        seeds: seeds per cell, 1 to `seeds`.
        epochs: epochs of every run; default the preset's.
        validation: training images held out for validation (see `TrainConfig`).
        limit: train on the first N images only.
        data_dir: folder of the MNIST IDX files.
        out: the sweep folder; each run goes to `<out>/runs/<cell>-seed<N>`.
    """

    grid: dict = dataclasses.field(default_factory=dict)
    seeds: int = 3
    epochs: int | None = None
    validation: int = 0
    limit: int | None = None
    data_dir: str | None = None
    out: str = os.path.join("sweeps", "sweep")

    def check(self):
        """Raises a `KernormError` naming the first axis, value or field that cannot be swept."""
        types = {"preset": str, **SWEEP_AXES}
        for axis, values in self.grid.items():
            if axis not in types:
                raise KernormError(f"unknown sweep axis {axis!r}; choose from {', '.join(types)}")
            if not isinstance(values, list) or not values:
                raise KernormError(f"sweep axis {axis!r} needs a non-empty list of values, not {values!r}")
            for value in values:
                allowed = (int, float) if types[axis] is float else types[axis]
                if not (isinstance(value, allowed) and not isinstance(value, bool)
                        or axis == "dropout" and value is None):
                    raise KernormError(f"sweep axis {axis!r}: {value!r} is not a {types[axis].__name__}")
                if types[axis] is not str and value is not None and value < 0:
                    raise KernormError(f"sweep axis {axis!r}: {value!r} is negative")
            if len(set(map(json.dumps, values))) != len(values):
                raise KernormError(f"sweep axis {axis!r} lists a value twice: {values!r}")
        for preset in self.grid.get("preset", []):
            check_choice("preset", preset, PRESETS)
        if self.seeds < 1:
            raise KernormError(f"--seeds {self.seeds}: a sweep needs at least 1 seed")
        return self

    def cells(self):
        """Every combination of the grid's values, in a fixed order.

        Returns:
            A list of `(coordinates, config)`: the combination as `{axis: value}`
            (the preset included), and its `TrainConfig` of seed 1, with op
            determinism on so that a run repeats exactly.
        """
        axes = {"preset": ["study"], **self.grid}
        fixed = dict(data_dir=self.data_dir, limit=self.limit, validation=self.validation, deterministic=True)
        if self.epochs:
            fixed["epochs"] = self.epochs
        cells = []
        for values in itertools.product(*axes.values()):
            coordinates = dict(zip(axes, values))
            chosen = {axis: value for axis, value in coordinates.items() if axis != "preset"}
            config = dataclasses.replace(PRESETS[coordinates["preset"]], **chosen, **fixed).check()
            cells.append((coordinates, config))
        return cells

    def save(self, path):
        write_json(path, dataclasses.asdict(self))
