"""The live progress display: a bar per channel while few, one summary when many, plain lines off a terminal."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console
from rich.progress import Progress as Bars

from cellbench.bench.faces import display
from cellbench.bench.faces.display import Display, summary
from cellbench.bench.runtime.engine import Progress


def progress(step: int = 1, kind: str = "CC Charge", volts: float = 3.7, hours: float = 1.0) -> Progress:
    return Progress(test_time=hours * 3600, step_count=step, total_steps=10, cycle=1, step_type=kind,
                    voltage=volts, current=1e-3)


def bars(terminal: bool) -> tuple[Bars, io.StringIO]:
    out = io.StringIO()
    return Bars(console=Console(file=out, force_terminal=terminal, width=300), auto_refresh=False), out


def test_few_channels_have_a_bar_each() -> None:
    shown, _ = bars(terminal=True)
    show = Display(shown)
    for k in range(3):
        show(f"ch{k}", progress(step=k + 2))
    assert [t.description.split(" · ")[0] for t in shown.tasks] == ["ch0", "ch1", "ch2"]
    assert [t.completed for t in shown.tasks] == [1, 2, 3]


def test_many_channels_are_summed_up_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    shown, _ = bars(terminal=True)
    show = Display(shown)
    for k in range(20):
        clock[0] += display.SUMMARY_EVERY  # redrawn at most every SUMMARY_EVERY s: here at each call
        show(f"ch{k:02d}", progress(step=3, kind="Rest" if k % 4 == 0 else "CC Charge", volts=3.0 + k * 0.01,
                                     hours=k * 0.5))
    (task,) = shown.tasks  # the first channels' bars gave way to it
    assert task.description.startswith("20 channels · 15 CC Charge, 5 Rest · 3.000 V (ch00) to 3.190 V (ch19)")
    assert "test time up to 9.50 h" in task.description
    assert (task.completed, task.total) == (20 * 2, 20 * 10)


def test_off_a_terminal_many_channels_write_one_line_a_minute(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    shown, out = bars(terminal=False)
    show = Display(shown)
    for second in range(120):  # two minutes of 1 Hz samples on 30 channels
        clock[0] = 1000.0 + second
        for k in range(30):
            show(f"ch{k}", progress())
    lines = out.getvalue().splitlines()
    # the first eight channels each had their line before there were too many for lines of their own; then a
    # summary at once (at the ninth) and one a minute later
    assert len(lines) == 8 + 2, lines
    assert " 9 channels · 9 CC Charge" in lines[8] and " 30 channels · 30 CC Charge" in lines[9]


def test_the_summary_names_the_extremes() -> None:
    latest = {"a": progress(volts=3.2), "b": progress(volts=4.1, kind="Rest"), "c": progress(volts=3.9)}
    line = summary(latest)
    assert line.startswith("3 channels · 2 CC Charge, 1 Rest · 3.200 V (a) to 4.100 V (b)")
    many = {f"c{k}": progress(kind=f"kind{k}") for k in range(5)}
    assert "· 1 kind0, 1 kind1, 1 kind2, 2 other ·" in summary(many)


def test_a_ten_channel_dry_run_is_summed_up_past_eight_channels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app

    n = 10
    (tmp_path / "bench.yaml").write_text("\n".join(
        ["name: ten", "instruments:"]
        + [f"  smu{k}: {{driver: keithley2450, resource: 'TCPIP::127.0.0.1::{5100 + k}::SOCKET'}}" for k in range(n)]
        + ["cells:"] + [f"  c{k}: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}" for k in range(n)]
        + ["channels:"] + [f"  ch{k}: {{cycler: smu{k}, cell: c{k}}}" for k in range(n)]) + "\n")
    (tmp_path / "rest.yaml").write_text("name: rest\nsample_period: 10 s\nsteps:\n  - rest: 2 min\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "rest.yaml"), "--bench", str(tmp_path / "bench.yaml"),
                                      "--dry-run", "--runs-dir", str(tmp_path / "runs")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    progress = [line for line in result.output.splitlines() if " step 1/1 " in line or " channels · " in line]
    # off a terminal: a line for each of the first eight channels, then one summing them up, not one per channel
    assert sum(" step 1/1 " in line for line in progress) == display.MAX_BARS
    assert any(" 9 channels · 9 Rest · " in line for line in progress), progress


def test_how_a_run_stopped_is_shown_and_counted() -> None:
    """The runner tells the display once more when a channel's run stops (completed, paused, latched, ...): off a
    terminal that line is always written, and the summary counts it in place of the step it stood in."""
    from dataclasses import replace

    shown, out = bars(terminal=False)
    show = Display(shown)
    show("ch1", progress(step=4))
    show("ch1", replace(progress(step=4), ended="completed"))  # within a second of the last line: still said
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and " ch1 completed at step 4/10 CC Charge" in lines[1]
    latest = {"a": progress(), "b": replace(progress(), ended="completed"), "c": replace(progress(), ended="paused")}
    assert summary(latest).startswith("3 channels · 1 CC Charge, 1 completed, 1 paused ·")


def test_a_run_started_later_on_a_channel_has_its_own_step_count_on_its_bar() -> None:
    """After `cellbench start` the channel's bar once kept the old run's step count (10 steps, then 3)."""
    import dataclasses

    shown, _ = bars(terminal=True)
    show = Display(shown)
    show("ch1", dataclasses.replace(progress(step=10), ended="completed"))
    show("ch1", dataclasses.replace(progress(step=1), total_steps=3))
    (task,) = shown.tasks
    assert task.total == 3 and task.completed == 0
