"""The README's start-to-finish chain, run from the README's own text so that the two cannot drift apart."""

import os
import pathlib
import re
import shlex

import pytest
from helpers import kernorm_command, run

REPO = pathlib.Path(__file__).resolve().parents[1]
# Appended to the chain's train line: later options win, so the README's values stay as written, while the
# test trains one short epoch and reads MNIST where the tests find it.
QUICK = ["--epochs", "1", "--limit", "12000"]


def chain():
    """The commands of the README's `start-to-finish` block, each split as a shell splits it (comments dropped)."""
    [block] = re.findall(r"```bash start-to-finish\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_chain_trains_exports_and_predicts_in_order():
    commands = chain()
    assert [command[:2] for command in commands] == [["kernorm", "train"], ["kernorm", "export"],
                                                     ["kernorm", "predict"], ["kernorm", "predict"]]
    assert "--digits" not in commands[2] and commands[3][-2:] == ["--runtime", "micro"]
    assert all((REPO / arg).is_file() for command in commands[2:] for arg in command if arg.startswith("tests/"))


@pytest.mark.slow
def test_the_readme_chain_runs_as_written(tmp_path, data_dir):
    (tmp_path / "tests").symlink_to(REPO / "tests")  # the photos the chain reads, at the same relative path
    environment = {key: value for key, value in os.environ.items() if key != "KERNORM_DATA_DIR"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    outputs = []
    for command in chain():
        if command[1] == "train":  # export reads MNIST from the folder the run recorded
            command = command + QUICK + ["--data-dir", data_dir]
        result = run(kernorm_command(*command[1:]), cwd=tmp_path, env=environment)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        outputs.append(result.stdout)
    assert "all checks passed" in outputs[1]
    photo = chain()[2][-1]
    answers = [output.strip().splitlines()[-1] for output in outputs[2:]]
    assert all(answer.startswith(f"{photo}: ") for answer in answers)
    assert answers[0].split()[1] == answers[1].split()[1]  # LiteRT and TFLM read the same digit
