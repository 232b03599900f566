"""The live progress of a run's channels: a bar per channel while they are few, one line summing them all up
when they are many (a thousand bars would cost the control loop its timing and show nothing readable), and
plain lines when the output is not a terminal (nohup, systemd, a CI log).

A `Display` is the runner's `on_progress`: called with every sample of every channel, it only notes the
channel's latest progress; what is shown is redrawn at most every SUMMARY_EVERY s of wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from cellbench.bench.ops.runs import utc

if TYPE_CHECKING:
    from rich.progress import Progress as Bars

    from cellbench.bench.runtime.engine import Progress

MAX_BARS = 8  # channels shown with a bar each; more are summed up on one line
SUMMARY_EVERY = 0.5  # s of wall time between two redraws of the summary
PLAIN_EVERY = 60.0  # s of wall time between two progress lines (per channel, or of the summary) off a terminal
PLAIN_NEW_STEP = 2.0  # s at least between two lines for a channel's new steps (a dry run changes step every few ms)


def summary(latest: dict[str, Progress]) -> str:
    """One line for many channels: how many, what they do (or how their run stopped: completed, paused, ...), the
    lowest and highest voltage and where."""
    doing = Counter(p.ended or p.step_type for p in latest.values())
    what = ", ".join(f"{n} {kind}" for kind, n in doing.most_common(3))
    if len(doing) > 3:
        what += f", {sum(n for _, n in doing.most_common()[3:])} other"
    low = min(latest, key=lambda c: latest[c].voltage)
    high = max(latest, key=lambda c: latest[c].voltage)
    longest = max(p.test_time for p in latest.values())
    return (f"{len(latest)} channels · {what} · {latest[low].voltage:.3f} V ({low}) to {latest[high].voltage:.3f} V "
            f"({high}) · test time up to {longest / 3600:.2f} h")


def silence_output() -> None:
    """Standard output (and error) that cannot be written any more go to /dev/null: every later write, ours or a
    library's or the interpreter's at exit, is dropped instead of raising."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


class Display:
    """Progress for every channel of a run on `bars` (a rich Progress); `label` tags it (e.g. "resumed")."""

    def __init__(self, bars: Bars, label: str = "", *, max_bars: int = MAX_BARS) -> None:
        self.bars, self.max_bars = bars, max_bars
        self.tag = f" · {label}" if label else ""
        self.terminal = bars.console.is_terminal
        self.latest: dict[str, Progress] = {}
        self.tasks: dict[str, Any] = {}  # a bar per channel, while they are few
        self.summary_task: Any = None
        self.shown = 0.0  # when the summary was last drawn (time.monotonic)
        self.last_line: dict[str, tuple[float, int]] = {}  # plain lines: (when, step) by channel
        self.silent = False  # the output failed: nothing more is shown

    @property
    def summarised(self) -> bool:
        return len(self.latest) > self.max_bars

    def __call__(self, channel: str, p: Progress) -> None:
        """Show a channel's progress. The output may fail (a closed pipe: `| head`, a full disk): the run must
        not; the display falls silent instead (silence_output), and the run goes on to its end."""
        if self.silent:
            return
        try:
            self._show(channel, p)
        except OSError:  # BrokenPipeError, ENOSPC ...
            self.silent = True
            silence_output()

    def _show(self, channel: str, p: Progress) -> None:
        self.latest[channel] = p
        if self.summarised:
            self._summary()  # (runs that stop show at the next redraw: a thousand ends must not draw a thousand)
        elif self.terminal:
            self._bar(channel, p)
        else:
            self._plain(channel, p)

    def _bar(self, channel: str, p: Progress) -> None:
        if channel not in self.tasks:
            self.tasks[channel] = self.bars.add_task(channel, total=p.total_steps)
        done = p.total_steps if p.ended == "completed" else p.step_count - 1
        # total given every time: a run started later on the channel (`cellbench start`) has its own step count
        self.bars.update(self.tasks[channel], completed=done, total=p.total_steps, description=(
            f"{channel}{self.tag} · cycle {p.cycle} · {p.ended or p.step_type:<12} · {p.voltage:6.3f} V "
            f"{p.current * 1e3:+8.4f} mA · test time {p.test_time / 3600:7.2f} h"))

    def _summary(self) -> None:
        now = time.monotonic()
        if now - self.shown < (SUMMARY_EVERY if self.terminal else PLAIN_EVERY):
            return
        self.shown = now
        line = summary(self.latest)
        if not self.terminal:
            self.bars.console.print(f"{utc(time.time())} {line}", highlight=False, soft_wrap=True)
            return
        for task in self.tasks.values():  # the bars of the first channels give way to the summary
            self.bars.remove_task(task)
        self.tasks.clear()
        done = sum(p.step_count - 1 for p in self.latest.values())
        total = sum(p.total_steps for p in self.latest.values())
        if self.summary_task is None:
            self.summary_task = self.bars.add_task(line, total=total)
        self.bars.update(self.summary_task, completed=done, total=total, description=f"{line}{self.tag}")

    def _plain(self, channel: str, p: Progress) -> None:
        """A line at a channel's new step (at most every PLAIN_NEW_STEP s) and every PLAIN_EVERY s."""
        now = time.monotonic()
        seen = self.last_line.get(channel)
        if p.ended is None and seen is not None and now - seen[0] < (
                PLAIN_NEW_STEP if seen[1] != p.step_count else PLAIN_EVERY):
            return  # (how a run stopped is always said)
        self.last_line[channel] = (now, p.step_count)
        self.bars.console.print(
            f"{utc(time.time())} {channel}{self.tag} {p.ended + ' at ' if p.ended else ''}"
            f"step {p.step_count}/{p.total_steps} {p.step_type} cycle "
            f"{p.cycle} {p.voltage:.4f} V {p.current * 1e3:+.4f} mA test time {p.test_time / 3600:.3f} h",
            highlight=False, soft_wrap=True)
