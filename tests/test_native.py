"""kernorm's C++ norm ops: how they reject bad shapes, how processes starting together build them, and what a
crash in native code prints while the CLI keeps TensorFlow's native logs quiet."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import tensorflow as tf
from helpers import TIMEOUT, run_python

from kernorm import native

# id: (x, gamma, beta, groups) shapes the forward op rejects
FORWARD_CASES = {
    "x-rank-2": ((4, 6), (6,), (6,), 1),
    "x-rank-4": ((2, 3, 3, 6), (6,), (6,), 1),
    "no-channels": ((2, 3, 0), (0,), (0,), 1),
    "groups-not-dividing": ((2, 3, 6), (6,), (6,), 4),
    "more-groups-than-channels": ((2, 3, 2), (2,), (2,), 4),
    "gamma-too-short": ((2, 3, 6), (5,), (6,), 1),
    "gamma-rank-2": ((2, 3, 6), (1, 6), (6,), 1),
    "beta-too-long": ((2, 3, 6), (6,), (7,), 2),
}
# id: (dy, x, gamma, mean, inv, groups) shapes the gradient op rejects
GRADIENT_CASES = {
    "dy-not-x": ((2, 4, 6), (2, 3, 6), (6,), (2, 2), (2, 2), 2),
    "x-rank-2": ((4, 6), (4, 6), (6,), (4, 2), (4, 2), 2),
    "no-channels": ((2, 3, 0), (2, 3, 0), (0,), (2, 1), (2, 1), 1),
    "groups-not-dividing": ((2, 3, 6), (2, 3, 6), (6,), (2, 4), (2, 4), 4),
    "gamma-too-short": ((2, 3, 6), (2, 3, 6), (5,), (2, 2), (2, 2), 2),
    "mean-other-groups": ((2, 3, 6), (2, 3, 6), (6,), (2, 3), (2, 2), 2),
    "inv-other-rows": ((2, 3, 6), (2, 3, 6), (6,), (2, 2), (1, 2), 2),
}


def expect_rejected(call, graph):
    """Runs `call`, eagerly (the kernel checks) or built into a graph (the shape function checks), and asserts
    it fails with a TensorFlow error: a crash ends the test process instead."""
    if graph:
        with pytest.raises(ValueError):  # what TensorFlow makes of a failed shape function while tracing
            tf.function(call)()
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="must be"):
            call()


@pytest.mark.parametrize("graph", [False, True], ids=["kernel", "shape-function"])
@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("norm_path", ["native"], indirect=True)
def test_the_forward_op_rejects_bad_shapes(case, graph, norm_path):
    x, gamma, beta, groups = FORWARD_CASES[case]
    expect_rejected(lambda: native.ops().kernorm_normalize_groups(tf.ones(x), tf.ones(gamma), tf.ones(beta),
                                                                  groups=groups, epsilon=1e-5), graph)


@pytest.mark.parametrize("graph", [False, True], ids=["kernel", "shape-function"])
@pytest.mark.parametrize("case", GRADIENT_CASES)
@pytest.mark.parametrize("norm_path", ["native"], indirect=True)
def test_the_gradient_op_rejects_bad_shapes(case, graph, norm_path):
    shapes, groups = GRADIENT_CASES[case][:-1], GRADIENT_CASES[case][-1]
    expect_rejected(lambda: native.ops().kernorm_normalize_groups_grad(*map(tf.ones, shapes), groups=groups), graph)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="no C++ compiler on this machine")
def test_processes_starting_together_build_the_ops_once(tmp_path):
    log = tmp_path / "builds.log"
    compiler = tmp_path / "c++"  # the real compiler, logging each build (not the -dM -E runs asking it about the CPU)
    compiler.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo build >> "{log}";; esac\n'
                        f'exec "{shutil.which(os.environ.get("CXX", "g++"))}" "$@"\n')
    compiler.chmod(0o755)
    # Each process waits for the other at a barrier of files before loading, so that both find the cache empty.
    script = ("import pathlib, sys, time\nfrom kernorm import native\n"
              "ready = pathlib.Path(sys.argv[1])\n(ready / sys.argv[2]).touch()\n"
              "while len(list(ready.iterdir())) < 2:\n    time.sleep(0.01)\n"
              "native.load()\nprint('loaded')\n")
    (tmp_path / "ready").mkdir()
    env = {**os.environ, "CXX": str(compiler), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "ready"), str(n)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert [out.split() for out, _ in outputs] == [["loaded"], ["loaded"]]
    assert log.read_text().splitlines() == ["build"]
    cache = tmp_path / "cache" / "kernorm"
    assert len(list(cache.glob("*.so"))) == 1 and not list(cache.glob(".*.tmp*")), list(cache.iterdir())


@pytest.mark.parametrize("fatal", [signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT], ids=lambda s: s.name)
def test_a_fatal_signal_still_prints_its_traceback_with_native_logs_quiet(fatal):
    code = ("import os\nfrom kernorm.console import quiet_native_logs\nquiet_native_logs()\n"
            f"os.kill(os.getpid(), {int(fatal)})\n")
    crashed = run_python(["-c", code])
    assert crashed.returncode == -fatal
    assert "Fatal Python error" in crashed.stderr and 'File "<string>", line 4' in crashed.stderr, crashed.stderr
