"""Progress bars: drawn on a terminal or when asked, never into a pipe or file unless asked."""

from __future__ import annotations

import io
import sys

from conftest import MODELS

from onnxprune.cli import main
from onnxprune.progress import Bar, progress, shown


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_tty_or_switched_off(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress(range(5), 5, "calib")) == list(range(5))
    assert stream.getvalue() == ""
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    with shown(False):
        assert list(progress(range(5), 5, "calib")) == list(range(5))
    assert tty.getvalue() == ""


def test_draws_one_line_on_a_tty(monkeypatch) -> None:
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(progress(range(4), 4, "calib")) == list(range(4))
    out = tty.getvalue()
    assert out.startswith("\rcalib [") and out.endswith("\rcalib [" + "#" * 24 + "] 4/4\n")
    assert out.count("\n") == 1


def test_forced_onto_a_pipe_writes_a_line_per_tenth(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with shown(True), Bar(100, "cells") as bar:
        for i in range(100):
            bar.update(note=f"loss {i}")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 11  # 0/100, then 10/100 … 100/100
    assert lines[0] == "cells [" + "-" * 24 + "] 0/100"
    assert lines[-1] == "cells [" + "#" * 24 + "] 100/100 loss 99"


def _prune(tmp_path, *extra: str) -> list[str]:
    data = str(MODELS / "digits64_calib.npz")
    out = str(tmp_path / "out.onnx")
    args = [str(MODELS / "mlp.onnx"), "--method", "id", "--ratio", "0.3", "--data", data]
    return [*args, "--round-to", "1", "-o", out, *extra]


def test_cli_writes_no_progress_into_a_pipe_unless_asked(tmp_path, capsys) -> None:
    assert main(_prune(tmp_path)) == 0
    captured = capsys.readouterr()
    assert "calibrating" not in captured.err and "[#" not in captured.err + captured.out
    assert main(_prune(tmp_path, "--progress")) == 0
    err = capsys.readouterr().err
    assert "calibrating (statistics) [" + "#" * 24 + "]" in err
