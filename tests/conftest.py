import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    """`kernorm reproduce` on 512 training images for 2 epochs: (report folder, CLI output)."""
    from click.testing import CliRunner

    from kernorm.cli import main

    out = str(tmp_path_factory.mktemp("study") / "report")
    result = CliRunner().invoke(main, ["reproduce", "--epochs", "2", "--limit", "512", "--data-dir", data_dir,
                                       "--out", out])
    assert result.exit_code == 0, result.output
    return out, result.output
