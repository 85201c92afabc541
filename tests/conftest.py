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
