"""Progress bars: redrawn on a terminal, one plain line into a file or a pipe."""

import io
import sys

from kernorm.console import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_into_a_pipe_is_its_title_and_one_plain_line(capsys):
    bar = progress_bar(3, "counting images", unit_name="image")
    for _ in range(3):
        bar.add(1)
    lines = capsys.readouterr().out.split("\n")
    assert lines[0] == "counting images" and lines[1].startswith("3/3 - ") and lines[1].endswith("/image")
    assert lines[2:] == [""]


def test_a_bar_on_a_terminal_redraws_in_place(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    bar = progress_bar(3, "counting images", unit_name="image")
    for _ in range(3):
        bar.add(1)
    assert terminal.getvalue().startswith("counting images\n") and "\r" in terminal.getvalue()
    assert "\x1b[" in terminal.getvalue()  # Keras's colours


def test_a_quiet_bar_shows_nothing(capsys):
    bar = progress_bar(3, "counting images", verbose=False)
    bar.add(3)
    assert capsys.readouterr().out == ""
