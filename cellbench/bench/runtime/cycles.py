"""The cycle book: which cycle a step belongs to, what a finished cycle gave, the capacities a run measures and
the checks a step's end is judged by. Pure bookkeeping on the run's `RunState`: no instrument, no clock."""

from __future__ import annotations

import functools

from cellbench.bench.runtime import policy
from cellbench.bench.runtime.cells import CellConfig
from cellbench.bench.runtime.runstate import Ending, EndKind, RunState, Totals
from cellbench.profiles.controls import Control, StepType
from cellbench.profiles.program import Program
from cellbench.profiles.schema import Check, Profile, body_of


class CycleBook:
    """Cycles counted, references and checks, on one run state (a new book for a restored state)."""

    def __init__(self, profile: Profile, program: Program, cell: CellConfig, state: RunState) -> None:
        self.profile = profile
        self.program = program
        self.cell = cell
        self.state = state
        self.finished_whole = True  # whether the cycle that just ended had a whole charge and discharge

    def capacity(self) -> float:
        """What C-rates refer to: the measured capacity where the profile asks for it, else the cell's."""
        if self.profile.c_rate_basis == "measured" and self.state.measured_capacity:
            return self.state.measured_capacity
        return self.cell.capacity

    def advance(self, ctl: Control, explicit: bool) -> tuple[int, Totals] | None:
        """A step begins: count cycles; when one ends, return its number and totals."""
        st = self.state
        finished = None
        if self.profile.cycle_counting == "explicit":
            starts = explicit
        else:
            starts = ctl.direction > 0 and st.discharged and ctl.step_type is not StepType.REST
        if starts and st.cycle_has_run:
            finished = (st.cycle, st.cycle_totals)
            self.finished_whole = st.whole_charge and st.whole_discharge
            st.cycle += 1
            st.discharged = st.whole_charge = st.whole_discharge = False
            # where the last cycle stopped is as uncertain as where this one will: it sets where this one starts
            st.cycle_totals = Totals(carried_ah=st.cycle_totals.resolution_ah)
        st.cycle_has_run = True
        if ctl.direction < 0:
            st.discharged = True
        return finished

    def efficiency_signature(self, cycle: int, totals: Totals) -> str | None:
        """Two finished cycles in a row that gave back more charge than they took: a soft short's signature.
        One alone is not: a cycle discharged at a lower rate than the one before it (a reference test after
        faster cycling) gives back what the faster discharge had left in the cell."""
        rule, seen = self.profile.short_detection, self.state.high_efficiency
        if rule.action == "off" or cycle < 2 or totals.charge_ah < 0.5 * self.capacity():
            return None
        ce = totals.discharge_ah / totals.charge_ah
        excess = totals.discharge_ah - totals.charge_ah
        if ce <= rule.efficiency_above or excess <= totals.resolution_ah + totals.carried_ah:
            seen.clear()  # within what the sampling can place, or not above the threshold
            return None
        seen.append(ce)
        if len(seen) < 2:
            return None
        shown = " and ".join(f"{x * 100:.2f} %" for x in seen[-2:])
        seen.clear()
        return (f"soft short suspected: cycles {cycle - 1} and {cycle} gave back {shown} of their charge "
                f"(cycle {cycle}: {totals.discharge_ah * 1e3:.4f} of {totals.charge_ah * 1e3:.4f} mAh)")

    def after_step(self, ctl: Control, ending: Ending, totals: Totals, reference: bool = False) -> None:
        """A step ended: a charge or discharge ended by its limit makes its half of the cycle whole; a discharge
        that reached its voltage limit measures the capacity, and the first reference discharge (the first
        discharge at all, where the profile marks none) is the reference for retention."""
        st = self.state
        if ending.kind in policy.WHOLE_ENDS:
            st.whole_charge = st.whole_charge or ctl.step_type in policy.CHARGING
            st.whole_discharge = st.whole_discharge or ctl.step_type in policy.DISCHARGING
        if ctl.step_type is StepType.CC_DISCHARGE and ending.kind is EndKind.VOLTAGE and totals.discharge_ah > 0:
            st.measured_capacity = totals.discharge_ah
            if st.reference_capacity is None and (reference or not self.marks_references):
                st.reference_capacity = totals.discharge_ah

    def checked(self, checks: list[Check], ending: Ending, ctl: Control, totals: Totals) -> Ending:
        """A check that holds once the step ended sends the program where it says."""
        for check in checks:
            value = self.check_value(check.kind, ctl, totals)
            if value is not None and policy.holds(check.op, value, check.value):
                said = f"{ending.reason}; then {check.kind} {check.op} {check.value:g}"
                return Ending(ending.kind, said, check.then)
        return ending

    @functools.cached_property
    def marks_references(self) -> bool:
        return any(ins.op == "step" and getattr(body_of(ins.node), "reference", False) for ins in self.program.instrs)

    def check_value(self, kind: str, ctl: Control, totals: Totals) -> float | None:
        if kind == "retention":
            if not self.state.reference_capacity or ctl.direction >= 0:
                return None
            return totals.discharge_ah / self.state.reference_capacity
        if kind == "step_capacity":
            return max(totals.charge_ah, totals.discharge_ah)
        cycle = self.state.cycle_totals
        return cycle.charge_ah if ctl.direction > 0 else cycle.discharge_ah

    def emptied(self, ctl: Control) -> float | None:
        """How much of the cycle's charge a discharge to a voltage cut-off has taken out so far (None for other
        steps, or before anything was charged in the cycle)."""
        charged = self.state.cycle_totals.charge_ah
        if ctl.direction >= 0 or charged <= 0 or not any(lim.kind == "voltage" for lim in ctl.limits):
            return None
        return self.state.cycle_totals.discharge_ah / charged
