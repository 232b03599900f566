"""The short watch: one step's look for a lithium-metal short while the cell charges at constant current (the
profile's `short_detection`), fed with the engine's samples and the supervisor's readings alike."""

from __future__ import annotations

from collections import deque

from cellbench.bench.runtime import policy
from cellbench.profiles.controls import Control, StepType
from cellbench.profiles.schema import ShortDetection
from cellbench.roles import Reading


def charging_cc(ctl: Control, reading: Reading) -> bool:
    """A constant current charging: a CC charge, or the constant-current phase of a CCCV charge."""
    return ctl.step_type is StepType.CC_CHARGE or (
        ctl.step_type is StepType.CCCV_CHARGE and reading.current >= 0.98 * ctl.compliance)


class ShortWatch:
    """The voltage window of one step and the kinds of short already found in it (each is news once a step)."""

    def __init__(self, rule: ShortDetection, ctl: Control) -> None:
        self.rule = rule
        self.ctl = ctl
        self.voltages: deque[tuple[float, float]] = deque()  # (test time, V) over the rule's window
        self.found: set[str] = set()

    def look(self, t: float, reading: Reading) -> str | None:
        """A reading at test time t: the short it shows, the first time its kind is seen in the step, or None."""
        if self.rule.action == "off" or not charging_cc(self.ctl, reading):
            return None
        window = self.voltages
        short = policy.short_signature(window, t, reading.voltage, reading.current, self.rule)
        window.append((t, reading.voltage))
        while len(window) > 2 and t - window[1][0] >= self.rule.window:
            window.popleft()
        if short is None:
            return None
        window.clear()
        kind = short.split(":", 1)[0]
        if kind in self.found:
            return None  # flagged once per step and kind: a soft short that grows is not news every sample
        self.found.add(kind)
        return short
