"""What kernorm's commands print: kernorm's own lines and progress bars, not TensorFlow's or LiteRT's native logs.

TensorFlow, XLA and LiteRT log from C++ straight to the process's standard
error (file descriptor 2): start-up banners, "failed call to cuInit" on every
machine without a GPU, converter debug lines, "Created TensorFlow Lite
XNNPACK delegate". Some of them come before any log level can be set, so
`quiet_native_logs` points descriptor 2 at /dev/null for the rest of the
process and keeps Python's `sys.stderr`, where kernorm's warnings and errors
go, on the real standard error. The CLI calls it unless `--verbose` or
`KERNORM_VERBOSE=1` asks for everything. A fatal signal (SIGSEGV, SIGFPE,
SIGABRT, …) still prints Python's "Fatal Python error" and the traceback on
the real standard error.
"""

import faulthandler
import logging
import os
import sys

VERBOSE_ENV = "KERNORM_VERBOSE"


def quiet_native_logs():
    """Silences native logs and TensorFlow's Python warnings for the rest of this process.

    A fatal signal still prints its traceback (`faulthandler`, on the real standard error).

    Does nothing when standard error is not the process's own (under a test
    runner that captures it).
    """
    if sys.stderr is not sys.__stderr__:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing and checkpoint notices
    sys.stderr.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1)
    # On a fatal signal (a crash in native code) faulthandler prints "Fatal Python error" and the traceback:
    # to the real standard error, as descriptor 2 is about to go nowhere.
    faulthandler.enable(real)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = sys.__stderr__ = real


def interactive():
    """Whether standard output is a terminal, where progress bars redraw in place."""
    return sys.stdout.isatty()


def progress_bar(target, title=None, verbose=True, unit_name="step", stateful_metrics=None):
    """A `keras.utils.Progbar` of `target` steps: how every kernorm command shows a long step's progress.

    On a terminal the bar is redrawn in place. Where standard output is a file
    or a pipe it prints one plain line when it reaches `target`, without escape
    codes or redraws (Keras's own bar redraws on every POSIX system, terminal or not).

    Args:
        target: the steps in all.
        title: a line printed first, saying what the bar counts; None prints none.
        verbose: False shows nothing, not even the title.
        unit_name, stateful_metrics: as `keras.utils.Progbar` takes them.

    Returns:
        The `Progbar`: `update(current)` or `add(steps)` moves it.
    """
    import keras  # here, not above: the CLI and `kernorm predict` start without Keras

    if verbose and title:
        print(title, flush=True)
    mode = (1 if interactive() else 2) if verbose else 0
    return keras.utils.Progbar(target, verbose=mode, unit_name=unit_name, stateful_metrics=stateful_metrics)
