import os
import pathlib

import pytest

import kernorm  # noqa: F401  before any test imports TensorFlow: it asks TensorFlow for oneDNN, as users get it

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytest.register_assert_rewrite("helpers")  # the shared helpers' asserts explain their failures as tests' do

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(params=["native", "xla"])
def norm_path(request, monkeypatch):
    """Runs a test on each training path of kernorm's norms: the C++ ops (used even with a GPU visible) and XLA."""
    from kernorm import native

    if request.param == "xla":
        monkeypatch.setattr(native, "ops", lambda: None)
        return
    try:
        native.load()
    except native.BUILD_ERRORS as e:
        pytest.skip(f"the C++ norm ops do not build on this machine: {e}")
    monkeypatch.setattr(native, "ops", native.load)


@pytest.fixture(scope="session")
def data_dir():
    """MNIST's IDX files: KERNORM_DATA_DIR, or shared/data/mnist beside the repository."""
    path = os.environ.get("KERNORM_DATA_DIR") or str(REPO.parent / "shared" / "data" / "mnist")
    assert os.path.isfile(os.path.join(path, "train-images-idx3-ubyte.gz")), (
        f"MNIST not found in {path}; set KERNORM_DATA_DIR to the folder of the four IDX files")
    return path


@pytest.fixture(scope="session")
def mnist(data_dir):
    from kernorm.data import load_mnist

    return load_mnist(data_dir)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, data_dir):
    """`kernorm reproduce --seeds 2` on 512 training images for 2 epochs: (report folder, CLI output)."""
    from click.testing import CliRunner

    from kernorm.cli import main

    out = str(tmp_path_factory.mktemp("study") / "report")
    result = CliRunner().invoke(main, ["reproduce", "--epochs", "2", "--seeds", "2", "--limit", "512",
                                       "--data-dir", data_dir, "--out", out])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="session")
def exported(tmp_path_factory, data_dir):
    """A briefly trained LN model (1 epoch on 12,000 images), exported once in all four quantizations.

    The export runs through the CLI with a spy on the int8 calibration sampler.
    Returns a dict: run_dir, export_dir, output (the CLI's), calibration_calls
    (the sampler's argument and result per call).
    """
    from click.testing import CliRunner

    import kernorm.export
    from kernorm.cli import main
    from kernorm.config import TrainConfig
    from kernorm.train import train

    run_dir = str(tmp_path_factory.mktemp("export") / "ln")
    train(TrainConfig(norm="ln", epochs=1, limit=12000, data_dir=data_dir, out=run_dir), verbose=False)
    calls, sampler = [], kernorm.export.calibration_images

    def spy(x_train, count, *args):
        images = sampler(x_train, count, *args)
        calls.append((x_train, count, images))
        return images

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernorm.export, "calibration_images", spy)
        result = CliRunner().invoke(main, ["export", run_dir, "--quantize", "all", "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    return {"run_dir": run_dir, "export_dir": os.path.join(run_dir, "export"), "output": result.output,
            "calibration_calls": calls}


@pytest.fixture(scope="session")
def micro_exported(exported, tmp_path_factory, data_dir):
    """`exported`'s model exported again in int8 with `--micro`: a dict of export_dir and output (the CLI's)."""
    from click.testing import CliRunner

    from kernorm.cli import main

    out = str(tmp_path_factory.mktemp("micro") / "export")
    result = CliRunner().invoke(main, ["export", exported["run_dir"], "--micro", "--out", out, "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    return {"export_dir": out, "output": result.output}
