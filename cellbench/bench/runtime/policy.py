"""The policy of a run, as pure functions: which limit a reading crosses, whether it is safe, when to sample
next, what to record, and how much charge an interval carried. No I/O and no clock: each answer follows
from its arguments alone, so each can be checked by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cellbench.bench.runtime.cells import CellConfig
from cellbench.bench.runtime.runstate import Budget, Ending, EndKind, Totals
from cellbench.profiles.conditions import SENSOR_NAMES
from cellbench.profiles.controls import Control, StepType
from cellbench.profiles.schema import Limit, Range, RecordRule, ShortDetection
from cellbench.roles import Conditions, Reading

VOLTAGE_TOLERANCE = 1e-3  # V: a reading this close to a voltage limit counts as reaching it
MIN_INTERVAL = 1.0  # s: the shortest sample interval when closing in on a voltage limit
APPROACH_WINDOW = 0.05  # V: closer than this to a voltage limit, sample at MIN_INTERVAL
TAPER_STEP = 0.1  # the largest fraction a tapering current may fall between two samples
CURRENT_WINDOW = 0.02  # of a current limit: closer than this, sample at MIN_INTERVAL
KNEE_FROM = 0.8  # of the cycle's charge taken out by a discharge to a cut-off: from here sampling closes in
SAFE_MARGIN_LOW, SAFE_MARGIN_HIGH = 0.2, 0.1  # V outside the cell's window that stop the run
WRONG_SIGN_SHARE = 0.05  # of a discharge's current: a charging current above this (and the floor) is a fault
WRONG_SIGN_FLOOR = 1e-6  # A

# what makes a cycle's charge or discharge whole (its coulombic efficiency means something): a charging or a
# discharging step ended on one of these limits, not on time (a pulse, a rest), a budget or a stop
CHARGING = frozenset({StepType.CC_CHARGE, StepType.CCCV_CHARGE, StepType.CP_CHARGE, StepType.CV})
DISCHARGING = frozenset({StepType.CC_DISCHARGE, StepType.CCCV_DISCHARGE, StepType.CP_DISCHARGE, StepType.CR_DISCHARGE})
WHOLE_ENDS = frozenset({EndKind.VOLTAGE, EndKind.CURRENT, EndKind.STEP_CAPACITY, EndKind.CYCLE_CAPACITY,
                        EndKind.STEP_ENERGY, EndKind.CYCLE_ENERGY})

History = Sequence[tuple[float, Reading]]  # the step's last two samples: (test time, reading)


def resolve_limits(ctl: Control, *, capacity: float, last_voltage: float) -> list[Limit]:
    """C-rates in amps, each limit's direction made explicit, and the step's own duration as a time limit."""
    out = []
    for lim in ctl.limits:
        if lim.kind == "current" and lim.c_rate is not None:
            lim = lim.model_copy(update={"value": lim.c_rate * capacity})
        if lim.op is None:
            if lim.kind == "voltage":
                rising = ctl.direction > 0 or (ctl.direction == 0 and last_voltage < lim.value)
                op = ">=" if rising else "<="
            else:
                op = "<=" if lim.kind in ("current", "dvdt", "didt") else ">="
            lim = lim.model_copy(update={"op": op})
        out.append(lim)
    if ctl.duration is not None:
        out.append(Limit(kind="time", op=">=", value=ctl.duration))
    return out


def temperature_of(c: Conditions, sensor: str | None = None) -> float | None:
    """The named sensor's temperature (`cell`: T1, `chamber`: the air); unnamed, the cell's where it has a
    thermocouple, the chamber air otherwise."""
    if sensor is not None:
        return c.cell_c if sensor == "cell" else c.ambient_c
    return c.cell_c if c.cell_c is not None else c.ambient_c


def sensor_of(c: Conditions, sensor: str | None = None) -> str:
    """The words for the sensor `temperature_of` reads."""
    if sensor is None:
        sensor = "cell" if c.cell_c is not None else "chamber"
    return SENSOR_NAMES[sensor]


def observe(
    kind: str, *, direction: int, step: Totals, cycle: Totals, history: History, reading: Reading, t_step: float,
    conditions: Conditions,
) -> float | None:
    """The value of a limit's quantity now, or None where it cannot be known yet."""
    if kind == "voltage":
        return reading.voltage
    if kind == "current":
        return abs(reading.current)
    if kind == "time":
        return t_step
    if kind == "step_capacity":
        return max(step.charge_ah, step.discharge_ah)
    if kind == "step_energy":
        return max(step.charge_wh, step.discharge_wh)
    if kind == "cycle_capacity":
        return cycle.charge_ah if direction > 0 else cycle.discharge_ah
    if kind == "cycle_energy":
        return cycle.charge_wh if direction > 0 else cycle.discharge_wh
    if kind in ("dvdt", "didt") and len(history) == 2:
        (t0, a), (t1, b) = history
        if t1 <= t0:
            return None
        delta = (b.voltage - a.voltage) if kind == "dvdt" else (b.current - a.current)
        return abs(delta) / (t1 - t0)
    if kind == "temperature":
        return temperature_of(conditions)
    if kind == "pressure" and conditions.pressure_pa is not None:
        return conditions.pressure_pa
    return None


def limit_reached(limits: Sequence[Limit], values: dict[str, float | None]) -> Ending | None:
    """The first limit whose quantity (in `values`, by kind) has reached it."""
    for lim in limits:
        value = values.get(lim.kind)
        if value is None:
            continue
        tol = VOLTAGE_TOLERANCE if lim.kind == "voltage" else 1e-9 if lim.kind == "time" else 0.0
        if (lim.op == ">=" and value >= lim.value - tol) or (lim.op == "<=" and value <= lim.value + tol):
            reason = lim.describe() if lim.kind != "time" else f"time {lim.value:g} s"
            return Ending(EndKind(lim.kind), reason, lim.then)
    return None


def budget_ended(budgets: Sequence[Budget], t: float) -> Ending | None:
    for b in budgets:
        if t >= b.deadline - 1e-9:
            return Ending(EndKind.BUDGET, f"{b.name} ran out", b.target)
    return None


def next_deadline(limits: Sequence[Limit], step_start: float, budgets: Sequence[Budget]) -> float:
    """The test time of the next time limit or budget, when a sample must be taken exactly."""
    times = [step_start + lim.value for lim in limits if lim.kind == "time"]
    return min([*times, *(b.deadline for b in budgets)], default=math.inf)


def next_sample_at(scheduled: float, woke: float, interval: float) -> float:
    """When to sample next: on the schedule, not from the wake-up, so a late wake (a busy loop, a slow
    instrument) does not push every later sample back; woken early (for a deadline or an edge), from then;
    more than an interval late, an interval from now (the missed moment is not made up in a burst)."""
    base = scheduled if scheduled <= woke else woke
    return base + interval if base + interval > woke else woke + interval


def next_interval(period: float, limits: Sequence[Limit], history: History, emptied: float | None = None) -> float:
    """The sample period, shortened while the voltage closes in on a voltage limit (or a held voltage's current
    on its current limit).

    The interval shrinks to a quarter of the time to the crossing the last two samples predict,
    and to MIN_INTERVAL inside the approach window, so a steep end-of-discharge knee is caught
    within a second, not a period. `emptied` is the fraction of the cycle's charge a discharge to a voltage
    cut-off has taken out so far: past KNEE_FROM of it the interval shrinks with the square of what is left,
    to MIN_INTERVAL at the end, because the knee of a lithium-metal cell falls from a plateau faster than
    two samples on the plateau can tell.
    """
    interval = period
    if emptied is not None and emptied >= KNEE_FROM:
        left = max(0.0, 1.0 - emptied) / (1.0 - KNEE_FROM)
        interval = min(interval, max(MIN_INTERVAL, period * left * left))
    if len(history) < 2:
        return interval
    (t0, a), (t1, b) = history
    if t1 <= t0:
        return interval
    for lim in limits:
        if lim.kind == "voltage":
            slope, gap, window = (b.voltage - a.voltage) / (t1 - t0), lim.value - b.voltage, APPROACH_WINDOW
        elif lim.kind == "current":  # a held voltage's current tapering to its end (a CV's C/50)
            slope = (abs(b.current) - abs(a.current)) / (t1 - t0)
            gap, window = lim.value - abs(b.current), CURRENT_WINDOW * lim.value
            if slope < 0:  # a taper is counted by the trapezoid rule: a tenth of the current per interval at most
                interval = min(interval, max(MIN_INTERVAL, TAPER_STEP * abs(b.current) / -slope))
        else:
            continue
        if slope == 0 or gap / slope <= 0:
            continue
        if abs(gap) < window:  # a knee can steepen tenfold between two samples
            interval = min(interval, MIN_INTERVAL)
        else:
            interval = min(interval, max(MIN_INTERVAL, gap / slope / 4))
    return interval


def interval_charge(previous: tuple[float, Reading], now: float, r: Reading, held: float | None,
                    taper: bool = False) -> list[tuple[float, float]]:
    """Charge (Ah) and energy (Wh) since the previous sample, positive into the cell: one (Ah, Wh) piece, or
    two where the current changed sign in between (a voltage source at a cut-off that began to charge the
    cell), split where the straight line between the readings crosses zero, so that no charge counted on one
    side is netted against the other.

    While a current source holds its setpoint the current was that value all interval long
    (readings are taken under the held source), so the interval counts at the reading's
    current; otherwise (a voltage source, or a current source in compliance) the current
    moved, and the trapezoid rule counts it. Under a held voltage (`taper`) a current falling without
    changing sign decays as relaxation does, exponentially: the logarithmic mean of the two readings counts it
    exactly (the trapezoid would count the convex fall high, 0.1 % of a CV's charge at a tenth per interval).
    """
    t0, r0 = previous
    hours = (now - t0) / 3600.0
    if held is not None and abs(r.current - held) <= max(1e-8, 1e-3 * abs(held)):
        return [(r.current * hours, r.current * (r0.voltage + r.voltage) / 2 * hours)]
    if r0.current * r.current < 0:  # through zero: the crossing, by the straight line
        f = r0.current / (r0.current - r.current)
        return [(r0.current / 2 * hours * f, r0.current * r0.voltage / 2 * hours * f),
                (r.current / 2 * hours * (1 - f), r.current * r.voltage / 2 * hours * (1 - f))]
    if taper and 0.0 < r.current / r0.current < 1.0 - 1e-9:
        mean = (r0.current - r.current) / math.log(r0.current / r.current)
        return [(mean * hours, mean * (r0.voltage + r.voltage) / 2 * hours)]
    return [((r0.current + r.current) / 2 * hours,
             (r0.current * r0.voltage + r.current * r.voltage) / 2 * hours)]


def unsafe(r: Reading, cell: CellConfig, safety: Range | None, conditions: Conditions) -> str | None:
    """Why a reading is outside what the cell may see, or None."""
    if math.isnan(r.voltage) or math.isnan(r.current):
        return f"the cycler returned an overflow reading ({r.voltage}, {r.current})"
    low, high = cell.voltage_min - SAFE_MARGIN_LOW, cell.voltage_max + SAFE_MARGIN_HIGH
    if not low <= r.voltage <= high:
        return f"cell voltage {r.voltage:.4f} V is outside the safe window {low:g} to {high:g} V"
    if safety is None:
        return None
    if safety.voltage and not safety.voltage[0] <= r.voltage <= safety.voltage[1]:
        lo, hi = safety.voltage
        return f"cell voltage {r.voltage:.4f} V is outside the profile's safety range {lo:g} to {hi:g} V"
    if safety.current:
        lo, hi = (c.resolve(cell.capacity) for c in safety.current)
        if not lo <= r.current <= hi:
            return f"current {r.current:.6g} A is outside the profile's safety range {lo:g} to {hi:g} A"
    temperature = temperature_of(conditions, safety.temperature_sensor)
    pressure = conditions.pressure_pa
    if safety.temperature and temperature is not None:
        lo, hi = safety.temperature
        if not lo <= temperature <= hi:
            return (f"{sensor_of(conditions, safety.temperature_sensor)} temperature {temperature:.2f} degC is "
                    f"outside the profile's safety range {lo:g} to {hi:g} degC")
    if safety.pressure and pressure is not None:
        lo, hi = safety.pressure
        if not lo <= pressure <= hi:
            return (f"stack pressure {pressure / 1e6:.3f} MPa is outside the profile's safety range {lo / 1e6:g} to "
                    f"{hi / 1e6:g} MPa")
    if safety.displacement and conditions.displacement_um is not None:
        lo, hi = safety.displacement
        if not lo <= conditions.displacement_um <= hi:
            return (f"displacement {conditions.displacement_um:.1f} um is outside the profile's safety range "
                    f"{lo:g} to {hi:g} um (the stack swelled or gave way)")
    return None


def wrong_sign(r: Reading, discharging: float | None) -> str | None:
    """Why a reading taken during a discharge (`discharging`: its current's magnitude, A) charges the cell, or None.

    A voltage held at a discharge's end (a CCCV discharge, or a cut-off held by the instrument) sources current
    into a cell that a short pulls below it, up to the discharge's own current where the instrument's current
    limit is symmetric; a lithium short must never be charged."""
    if discharging is None or not r.current > max(WRONG_SIGN_SHARE * discharging, WRONG_SIGN_FLOOR):
        return None
    return (f"current of the wrong sign: {r.current * 1e3:+.4f} mA charges the cell during a discharge at "
            f"{discharging * 1e3:.4f} mA (a short pulls it below the voltage held?)")


def record_due(rule: RecordRule | None, last: tuple[float, Reading] | None, now: float, r: Reading) -> bool:
    """Whether the record rule asks for this sample (the first of a step always, and every one without a rule)."""
    if rule is None or last is None:
        return True
    t0, r0 = last
    return (
        (rule.every is not None and now - t0 >= rule.every - 1e-9)
        or (rule.voltage is not None and abs(r.voltage - r0.voltage) >= rule.voltage)
        or (rule.current is not None and abs(r.current - r0.current) >= rule.current)
    )


def short_signature(window: Sequence[tuple[float, float]], t: float, v: float, current: float,
                    rule: ShortDetection) -> str | None:
    """A lithium short while charging at constant current, from the step's recent (test time, voltage):
    a hard one collapses the voltage between two samples, a soft one makes it fall while charge flows."""
    if not window or current <= 0:
        return None
    t_prev, v_prev = window[-1]
    if v_prev - v >= rule.collapse:
        return (f"hard short: the voltage fell {(v_prev - v) * 1e3:.0f} mV in {t - t_prev:.0f} s while charging "
                f"at {current * 1e3:.4g} mA")
    t_peak, v_peak = max(window, key=lambda p: p[1])  # the window holds only the last `window` seconds
    if v_peak - v >= rule.drop:
        return (f"soft short: the voltage fell {(v_peak - v) * 1e3:.1f} mV in {t - t_peak:.0f} s while "
                f"charging at {current * 1e3:.4g} mA")
    return None


def holds(op: str, value: float, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound
