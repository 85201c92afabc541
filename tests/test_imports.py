"""What runs without TensorFlow: the configuration, the CLI's start-up and on-device prediction."""

import platform

import numpy as np
import pytest
from helpers import run_python
from PIL import Image

# Run after the code under test, in the same fresh interpreter: the heavy modules it imported.
PRINT_HEAVY = "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"


def run_fresh(code):
    """Runs `code` in a fresh interpreter; returns its output's lines, the last one the heavy modules it held."""
    result = run_python(["-c", f"import sys\n{code}\n{PRINT_HEAVY}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


@pytest.mark.parametrize("module", ["kernorm.config", "kernorm.cli", "kernorm.runtime", "kernorm.micro",
                                    "kernorm.images"])
def test_module_imports_no_tensorflow(module):
    assert run_fresh(f"import {module}")[-1] == "[]"


@pytest.mark.parametrize("runtime", ["litert", "micro"])
def test_predict_runs_without_tensorflow(tmp_path, runtime):
    from kernorm.export import convert
    from kernorm.models import build_model

    calibration = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1)).astype(np.float32)
    model_file = tmp_path / "model_int8.tflite"
    model_file.write_bytes(convert(build_model("ln"), "int8", calibration))
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a "1"
    np.save(tmp_path / "digit.npy", digit)
    Image.fromarray(255 - digit).resize((112, 112)).save(tmp_path / "digit.png")  # dark ink on white paper
    argv = ["predict", str(model_file), str(tmp_path / "digit.npy"), str(tmp_path / "digit.png"), "--runtime", runtime]
    numbers = argv + ["--digits", "--debug-dir", str(tmp_path / "crops")]
    code = (
        "from kernorm.cli import main\n"
        f"for argv in ({argv!r}, {numbers!r}):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert not exit.code, exit.code\n"
    )
    lines = run_fresh(code)
    assert [line.split(": ")[0].rsplit("/", 1)[-1] for line in lines[:4]] == ["digit.npy", "digit.png"] * 2
    assert (tmp_path / "crops" / "digit.png").is_file()
    assert lines[-1] == "[]"


def test_tensorflow_free_choices_match_the_registries():
    from kernorm import config, models, norms

    assert config.NORMS == tuple(norms.NORMS)
    assert config.ARCHITECTURES == tuple(models.ARCHITECTURES)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN is asked for on x86 only")
@pytest.mark.parametrize("setting, expected", [(None, "True"), ("0", "False")])
def test_importing_kernorm_first_turns_tensorflows_onednn_on_unless_told_not_to(setting, expected, monkeypatch):
    if setting is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", setting)
    lines = run_fresh("import kernorm\nfrom tensorflow.python.util import _pywrap_util_port\n"
                      "print(_pywrap_util_port.IsMklEnabled())")
    assert lines[0] == expected
