import gzip
import os

import numpy as np
import pytest

from kernorm.data import FILES, epoch_seeds, find_data_dir, load_mnist, make_dataset, read_idx, recorded_data_dir
from kernorm.errors import KernormError


def idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_dir(tmp_path, n_train=6, n_test=4, gz=True, **override):
    """A data folder of tiny IDX files; `override` maps a FILES key to raw bytes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": np.arange(n_test) % 10,
    }
    for key, stem in FILES.items():
        raw = override.get(key, idx_bytes(arrays[key]))
        if gz:
            (tmp_path / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (tmp_path / stem).write_bytes(raw)
    return tmp_path


def test_real_mnist(mnist):
    (x_train, y_train), (x_test, y_test) = mnist
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    assert set(np.unique(y_train)) == set(range(10))
    assert y_train[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's well-known first labels
    assert x_train.max() == 255


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzip_and_raw(tmp_path, gz):
    (x_train, y_train), (x_test, y_test) = load_mnist(str(make_dir(tmp_path, gz=gz)))
    assert x_train.shape == (6, 28, 28) and y_test.tolist() == [0, 1, 2, 3]


def test_env_var_names_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNORM_DATA_DIR", str(make_dir(tmp_path)))
    assert load_mnist()[0][0].shape == (6, 28, 28)


def test_missing_file_is_named(tmp_path):
    make_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(KernormError, match=r"t10k-labels-idx1-ubyte\.gz not found"):
        load_mnist(str(tmp_path))


def test_missing_dir(tmp_path):
    with pytest.raises(KernormError, match="does not exist"):
        load_mnist(str(tmp_path / "nope"))


def test_wrong_magic(tmp_path):
    make_dir(tmp_path, train_labels=b"\x00\x00\x0d\x01" + (6).to_bytes(4, "big") + bytes(24))
    with pytest.raises(KernormError, match="wrong magic number"):
        load_mnist(str(tmp_path))


def test_truncated_data(tmp_path):
    make_dir(tmp_path, test_images=idx_bytes(np.zeros((4, 28, 28)))[:-10])
    with pytest.raises(KernormError, match="truncated or corrupt"):
        load_mnist(str(tmp_path))


def test_truncated_gzip(tmp_path):
    make_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KernormError, match="cannot read"):
        load_mnist(str(tmp_path))


def test_counts_differ(tmp_path):
    make_dir(tmp_path, train_labels=idx_bytes(np.zeros(5)))
    with pytest.raises(KernormError, match="6 images but"):
        load_mnist(str(tmp_path))


def test_label_out_of_range(tmp_path):
    make_dir(tmp_path, test_labels=idx_bytes(np.array([0, 1, 12, 3])))
    with pytest.raises(KernormError, match="labels must lie in 0-9"):
        load_mnist(str(tmp_path))


def fail_download(monkeypatch):
    """Takes the network away: Keras's download fails as it does offline."""
    import keras

    def offline():
        raise Exception("URL fetch failure on https://example/mnist.npz: None -- [Errno -2] Name or service not "
                        "known\n(a second line of detail)")

    monkeypatch.delenv("KERNORM_DATA_DIR", raising=False)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)


def test_one_rule_finds_mnist_option_then_variable_then_the_run_s_folder(tmp_path, monkeypatch):
    folders = []
    for name, train_images in (("option", 1), ("variable", 2), ("recorded", 3)):
        (tmp_path / name).mkdir()
        folders.append(str(make_dir(tmp_path / name, n_train=train_images)))
    option, variable, recorded = folders
    monkeypatch.setenv("KERNORM_DATA_DIR", variable)
    assert find_data_dir(option, recorded) == option
    assert len(load_mnist(option, recorded)[0][0]) == 1
    assert find_data_dir(None, recorded) == variable
    assert len(load_mnist(None, recorded)[0][0]) == 2
    monkeypatch.delenv("KERNORM_DATA_DIR")
    assert find_data_dir(None, recorded) == recorded
    assert len(load_mnist(None, recorded)[0][0]) == 3
    # A folder the run recorded that is gone is passed over, to Keras's download (None).
    assert find_data_dir(None, str(tmp_path / "gone")) is None and find_data_dir() is None


def test_recorded_folder_is_the_data_dir_of_a_config_file(tmp_path):
    (tmp_path / "config.json").write_text('{"norm": "ln", "data_dir": "../mnist"}')
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert recorded_data_dir(str(tmp_path / "config.json")) == "../mnist"
    assert recorded_data_dir(str(tmp_path / "bad.json")) is None
    assert recorded_data_dir(str(tmp_path / "missing.json")) is None


def test_failed_download_names_its_cause_and_the_fix_in_one_line(monkeypatch, tmp_path):
    fail_download(monkeypatch)
    with pytest.raises(KernormError) as error:
        load_mnist()
    assert str(error.value) == ("downloading MNIST failed (URL fetch failure on https://example/mnist.npz: None -- "
                                "[Errno -2] Name or service not known); pass --data-dir DIR (or set "
                                "KERNORM_DATA_DIR) with the four MNIST IDX files")
    gone = str(tmp_path / "gone")
    with pytest.raises(KernormError, match=f"Name or service not known\\); the run's folder {gone} does not exist "
                                           f"here; pass --data-dir DIR") as error:
        load_mnist(None, gone)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_every_command_reads_the_folder_the_run_recorded(tmp_path, monkeypatch):
    """train records the folder it read; train (again), export, gallery and compare fall back on it, offline."""
    from click.testing import CliRunner

    from kernorm.cli import main

    data = tmp_path / "mnist"
    data.mkdir()
    make_dir(data)
    run = str(tmp_path / "run")
    monkeypatch.setenv("KERNORM_DATA_DIR", str(data))
    train = ["train", "--epochs", "1", "--out", run]
    result = CliRunner().invoke(main, train)
    assert result.exit_code == 0, result.output
    assert recorded_data_dir(os.path.join(run, "config.json")) == str(data)

    fail_download(monkeypatch)
    result = CliRunner().invoke(main, train + ["--overwrite"])
    assert result.exit_code == 0, result.output
    # export reads the run's 6 training images: too few for 500 calibration images.
    result = CliRunner().invoke(main, ["export", run])
    assert result.exit_code == 1
    assert "--calibration 500: choose between 1 and the 6 training images" in result.output
    result = CliRunner().invoke(main, ["gallery", run, "--out", str(tmp_path / "wrong.png")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["compare", run, run])
    assert result.exit_code == 0 and "McNemar's exact test, run against run: 0 test images" in result.output

    os.rename(data, tmp_path / "moved")
    for command in (["export", run], ["gallery", run, "--out", str(tmp_path / "wrong.png")], ["compare", run, run]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.splitlines()[-1] == (  # compare prints its table first
            f"Error: downloading MNIST failed (URL fetch failure on https://example/mnist.npz: None -- [Errno -2] "
            f"Name or service not known); the run's folder {data} does not exist here; pass --data-dir DIR (or set "
            f"KERNORM_DATA_DIR) with the four MNIST IDX files")


def test_read_idx_shape(data_dir):
    labels = read_idx(f"{data_dir}/t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)


def test_dataset_batches_and_shuffles_by_seed():
    x = np.arange(10 * 28 * 28, dtype=np.uint8).reshape(10, 28, 28)
    y = np.arange(10)
    ordered = [b[1].numpy().tolist() for b in make_dataset(x, y, 4)]
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    first = np.concatenate([b[1] for b in make_dataset(x, y, 4, seed=3)])
    again = np.concatenate([b[1] for b in make_dataset(x, y, 4, seed=3)])
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != list(range(10))
    np.testing.assert_array_equal(first, again)
    images, _ = next(iter(make_dataset(x, y, 4)))
    assert images.shape == (4, 28, 28, 1) and images.dtype.name == "float32"


def test_seeds_and_epochs_draw_independent_streams():
    # seed r at epoch e + 1 and seed r + 1 at epoch e must not share a shuffle or an augmentation draw.
    assert epoch_seeds(1, 3) != epoch_seeds(2, 2)
    shuffle, augment_key = epoch_seeds(1, 3)
    assert shuffle != augment_key and epoch_seeds(1, 3) == (shuffle, augment_key)
    x = np.zeros((64, 28, 28), np.uint8)
    y = np.arange(64)
    order = {(s, e): np.concatenate([b[1] for b in make_dataset(x, y, 64, seed=s, epoch=e)]).tolist()
             for s, e in [(1, 3), (2, 2)]}
    assert order[1, 3] != order[2, 2]
