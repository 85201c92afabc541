"""Every command's configuration, the training presets and every list of choices.

This module imports neither TensorFlow nor Keras, so the command line can
build its options from it and `kernorm predict` can start without them. Each
configuration is a dataclass that is saved as JSON beside what it made.
"""

import dataclasses
import json
import os

from kernorm.errors import KernormError, check_choice
from kernorm.files import write_json

# Lists of choices. `kernorm.norms.NORMS` and `kernorm.models.ARCHITECTURES` hold one
# entry for each name here.
NORMS = ("bn", "ln", "gn", "none")
ARCHITECTURES = ("study", "compact")
SCHEDULES = ("constant", "onecycle")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")
# "last": one Dropout after each conv block; "all": one after every conv layer.
DROPOUT_LAYERS = ("last", "all")
# Channel groups of group normalization, the study's GN(2, C).
DEFAULT_GROUPS = 2


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run; saved as `config.json` in the run folder.

    Defaults are the study's set-up: its network, SGD with constant lr 0.01 and
    momentum 0.9, batch 128, 25 epochs, seed 1, no augmentation. `PRESETS`
    holds other recipes. `batch_size` is the global batch: each step splits it
    over the strategy's replicas. With `schedule="onecycle"`, `lr` is the peak
    learning rate (see `kernorm.steps.learning_rate`). `augment` rotates and
    shifts the training images in the input pipeline (`kernorm.data.augment`);
    the model never holds it.
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

    def check(self):
        """Raises a `KernormError` naming the first field that holds no valid choice."""
        for what, value, choices in (("architecture", self.architecture, ARCHITECTURES),
                                     ("norm", self.norm, NORMS), ("schedule", self.schedule, SCHEDULES),
                                     ("precision", self.precision, PRECISIONS),
                                     ("strategy", self.strategy, STRATEGIES),
                                     ("dropout placement", self.dropout_layers, DROPOUT_LAYERS)):
            check_choice(what, value, choices)
        return self

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

# Training recipes by name; command-line options override their fields.
PRESETS = {
    "study": TrainConfig(),
    "compact": TrainConfig(architecture="compact", l2=2.5e-4, epochs=15, lr=0.1, schedule="onecycle",
                           augment=True),
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
    """

    model: str
    quantize: str = "int8"
    out: str | None = None
    max_drop: float = 0.3
    calibration: int = 500
    data_dir: str | None = None

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

    def save(self, path):
        write_json(path, dataclasses.asdict(self))


@dataclasses.dataclass
class ReproduceConfig:
    """`kernorm reproduce`'s configuration; saved as `reproduce.json` in the report folder.

    The training set-up is the study's (`TrainConfig`'s defaults: SGD lr 0.01,
    momentum 0.9, batch 128, seed 1), with op determinism on so that a
    reproduction repeats exactly.
    """

    epochs: int = 25
    out: str = os.path.join("reports", "study")
    data_dir: str | None = None
    limit: int | None = None

    def train_config(self, experiment):
        """The `TrainConfig` of one of the study's experiments, its run folder inside `out`."""
        return TrainConfig(norm=experiment.norm, l1=experiment.l1, l2=experiment.l2, epochs=self.epochs,
                           data_dir=self.data_dir, limit=self.limit, deterministic=True,
                           out=os.path.join(self.out, "runs", experiment.name))
