"""From recorded samples to answers: the per-cycle table, cycle life, DCIR and dQ/dV."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cellbench.bench.runtime import policy
from cellbench.bench.runtime.events import Sample

EDGE_MAX_GAP = 0.05  # s: two samples this close around a current step are a DCIR pair
EDGE_MIN_GAP = 0.005  # s: ... and at least this far apart (a reading at the edge itself is no 10 ms value)
EDGE_FLOOR_A = 1e-7  # A: no smaller change of current is an edge
CE_FLOOR_AH = 1e-7  # Ah: below this a cycle's charge or discharge is noise, and its CE is not shown


@dataclass(frozen=True)
class CycleSummary:
    cycle: int
    charge_ah: float
    discharge_ah: float
    charge_wh: float
    discharge_wh: float
    retention: float | None = None  # discharge capacity over the first cycle's that had one
    volume_cm3: float | None = None
    stack_volume_cm3: float | None = None  # under pressure, swollen by the largest displacement of the cycle
    mass_g: float | None = None  # active material
    area_cm2: float | None = None  # active area

    @property
    def specific_capacity_mah_g(self) -> float | None:
        """Discharge capacity per gram of active material."""
        return self.discharge_ah * 1e3 / self.mass_g if self.mass_g else None

    @property
    def areal_capacity_mah_cm2(self) -> float | None:
        """Discharge capacity per cm² of active area."""
        return self.discharge_ah * 1e3 / self.area_cm2 if self.area_cm2 else None

    whole: bool = True  # the cycle has a whole charge and a whole discharge (see whole_cycles)

    @property
    def coulombic_efficiency(self) -> float | None:
        """Discharge over charge of the same cycle; None unless both are above the noise floor (CE_FLOOR_AH), and
        for a cycle without a whole charge and discharge (pulses, a cycle cut short): an HPPC cycle's 0.2 mAh of
        charge pulses against its 30 mAh of discharge once read 16,278 %."""
        if not self.whole or self.charge_ah < CE_FLOOR_AH or self.discharge_ah < CE_FLOOR_AH:
            return None
        return self.discharge_ah / self.charge_ah

    @property
    def energy_efficiency(self) -> float | None:
        return self.discharge_wh / self.charge_wh if self.charge_wh > 0 else None

    @property
    def mean_charge_voltage(self) -> float | None:
        return self.charge_wh / self.charge_ah if self.charge_ah > 0 else None

    @property
    def mean_discharge_voltage(self) -> float | None:
        return self.discharge_wh / self.discharge_ah if self.discharge_ah > 0 else None

    @property
    def energy_density_wh_l(self) -> float | None:
        """Discharge energy over the cell's volume."""
        if not self.volume_cm3 or self.discharge_wh <= 0:
            return None
        return self.discharge_wh / (self.volume_cm3 / 1000.0)

    @property
    def stack_energy_density_wh_l(self) -> float | None:
        """Discharge energy over the stack's volume under pressure, where displacement was recorded."""
        if not self.stack_volume_cm3 or self.discharge_wh <= 0:
            return None
        return self.discharge_wh / (self.stack_volume_cm3 / 1000.0)


def run_cycle_table(samples: Iterable[Sample], cell: dict[str, Any] | None,
                    references: dict[int, float] | None = None, whole: set[int] | None = None
                    ) -> list[CycleSummary]:
    """The per-cycle table of a run, scaled by the cell its metadata records (volume, thickness, mass, area)."""
    cell = cell or {}
    dims = cell.get("dimensions")
    return cycle_table(samples, cell.get("volume_cm3"), dims[2] if dims else None,
                       mass_g=cell.get("active_mass_g"), area_cm2=cell.get("area"), references=references,
                       whole=whole)


def store_table(store: Any) -> list[CycleSummary]:
    """A run store's per-cycle table, its retention taken from its reference steps where the profile marks them,
    its coulombic efficiency only for cycles with a whole charge and discharge."""
    samples, meta, steps = store.samples(), store.metadata(), store.steps()
    return run_cycle_table(samples, meta.get("cell"), references(samples, steps, meta.get("profile_text")),
                           whole_cycles(steps))


CHARGING = tuple(str(t) for t in policy.CHARGING)
DISCHARGING = tuple(str(t) for t in policy.DISCHARGING)
WHOLE_ENDS = tuple(str(k) for k in policy.WHOLE_ENDS)  # an end reason starts with its limit's kind


def whole_cycles(steps: Iterable[dict[str, Any]]) -> set[int]:
    """The cycles with a whole charge and a whole discharge: a charging step and a discharging step that each
    ended on a voltage, current, capacity or energy limit (not on time, as pulses do, nor cut short)."""
    charged: set[int] = set()
    discharged: set[int] = set()
    for st in steps:
        if not str(st.get("end_reason") or "").startswith(WHOLE_ENDS):
            continue
        if st.get("step_type") in CHARGING:
            charged.add(st["cycle"])
        elif st.get("step_type") in DISCHARGING:
            discharged.add(st["cycle"])
    return charged & discharged


def references(samples: Sequence[Sample], steps: Sequence[dict[str, Any]], profile_text: str | None
               ) -> dict[int, float]:
    """Each cycle's reference capacity (Ah): what its discharge steps marked `reference: true` in the profile
    took out, where they ended on their voltage limit. Empty when the profile marks none."""
    from cellbench.bench.runtime.walker import dotted
    from cellbench.profiles.parse import InputError, parse_profile
    from cellbench.profiles.program import compile_profile
    from cellbench.profiles.schema import body_of

    if not profile_text:
        return {}
    try:
        program = compile_profile(parse_profile(profile_text))
    except InputError:
        return {}
    marked = {dotted(ins.path) for ins in program.instrs
              if ins.op == "step" and getattr(body_of(ins.node), "reference", False)}
    ends = {s["step_count"] for s in steps if s["path"] in marked and str(s["end_reason"]).startswith("voltage")}
    before: dict[int, float] = {}
    last: dict[int, Sample] = {}
    previous: Sample | None = None
    for smp in samples:
        if smp.step_count in ends:
            if smp.step_count not in before:
                same = previous is not None and previous.cycle == smp.cycle
                before[smp.step_count] = previous.discharge_ah if same and previous is not None else 0.0
            last[smp.step_count] = smp
        previous = smp
    out: dict[int, float] = {}
    for step, smp in sorted(last.items()):
        out.setdefault(smp.cycle, smp.discharge_ah - before[step])
    return out


def cycle_table(
    samples: Iterable[Sample], volume_cm3: float | None = None, thickness_mm: float | None = None,
    *, mass_g: float | None = None, area_cm2: float | None = None, references: dict[int, float] | None = None,
    whole: set[int] | None = None,
) -> list[CycleSummary]:
    """One row per cycle; the accumulators restart each cycle, so a cycle's last sample holds its totals.

    Retention is each cycle's discharge capacity over the first cycle's that had one; with `references`
    (cycle -> reference capacity, `references()`), only the reference cycles have one: their reference
    capacity over the first, so a fast ageing cycle is never compared with a slow reference.

    With the cell's thickness and a recorded displacement, the stack volume of each cycle is the
    cell's volume stretched by the largest displacement of that cycle. `whole` (`whole_cycles`): the cycles
    whose coulombic efficiency means something; by default every one.
    """
    last: dict[int, Sample] = {}
    swell: dict[int, float] = {}
    for s in samples:
        last[s.cycle] = s
        if s.displacement_um is not None:
            swell[s.cycle] = max(swell.get(s.cycle, s.displacement_um), s.displacement_um)
    reference = next((s.discharge_ah for _, s in sorted(last.items()) if s.discharge_ah > 0), None)
    first_ref = next((q for _, q in sorted((references or {}).items()) if q > 0), None)
    rows = []
    for c, s in sorted(last.items()):
        stack = None
        if volume_cm3 and thickness_mm and c in swell:
            stack = volume_cm3 * (thickness_mm + swell[c] / 1000.0) / thickness_mm
        if references:
            retention = references[c] / first_ref if first_ref and c in references else None
        else:
            retention = s.discharge_ah / reference if reference else None
        rows.append(CycleSummary(
            c, s.charge_ah, s.discharge_ah, s.charge_wh, s.discharge_wh, retention, volume_cm3, stack, mass_g,
            area_cm2, whole is None or c in whole,
        ))
    return rows


def cycle_life(retention: Sequence[float], threshold: float = 0.8, cycles: Sequence[int] | None = None
               ) -> float | None:
    """Cycles after the first until the retention falls to the threshold (interpolated), or None. `cycles` are
    the cycle numbers the retentions belong to (reference cycles every 25, say); by default one apart."""
    at = list(cycles) if cycles is not None else list(range(len(retention)))
    for k in range(1, len(retention)):
        a, b = retention[k - 1], retention[k]
        if b <= threshold:
            x = at[k - 1] + (a - threshold) / (a - b) * (at[k] - at[k - 1]) if a > b else float(at[k])
            return x - at[0]
    return None


@dataclass(frozen=True)
class Dcir:
    test_time: float
    delta_current: float
    resistance_10ms: float
    resistance_2s: float | None


def dcir(samples: Sequence[Sample]) -> list[Dcir]:
    """DC internal resistance at each current step sampled on both sides (HPPC pulse edges, step starts).

    At 10 ms: ΔV/ΔI between the sample just before the edge and the one 10 ms after it (the engine samples
    there after every current edge; a pair closer than 5 ms is not a 10 ms value and is skipped). At 2 s:
    from the sample before the edge to the one 2 to 2.5 s after it, where the current still holds the new
    value within 1 % of the step. Steps smaller than 1 % of the run's largest current (noise on a rest, an
    impedance-only run) are not edges.
    """
    floor = max(EDGE_FLOOR_A, 0.01 * max((abs(s.current) for s in samples), default=0.0))
    out = []
    for k in range(1, len(samples)):
        a, b = samples[k - 1], samples[k]
        di, gap = b.current - a.current, b.test_time - a.test_time
        if not EDGE_MIN_GAP <= gap <= EDGE_MAX_GAP or abs(di) < floor:
            continue
        later = next((s for s in samples[k:] if s.test_time - a.test_time >= 2.0 - 1e-6), None)
        r2 = None
        if (later is not None and later.test_time - a.test_time <= 2.5
                and abs(later.current - b.current) <= 0.01 * abs(di)):
            r2 = (later.voltage - a.voltage) / di
        out.append(Dcir(a.test_time, di, (b.voltage - a.voltage) / di, r2))
    return out


def dqdv(samples: Sequence[Sample], *, cycle: int | None = None, discharge: bool = True, bin_v: float = 0.002,
         window: int = 9) -> list[tuple[float, float]]:
    """Incremental capacity dQ/dV (Ah/V) against voltage for one half-cycle: the constant-current samples of
    `cycle` (by default the last cycle that has that half) running the chosen way; rests, noise and a CV tail
    are left out (the current must be within 2 % of the half's median). The capacity is interpolated on a
    voltage grid of `bin_v` and differentiated by a Savitzky-Golay filter over `window` grid points."""
    from cellbench.bench.runtime.extras import need

    savgol_filter = need("scipy.signal", "dQ/dV").savgol_filter

    def flowing(s: Sample) -> bool:
        return (s.current < 0) if discharge else (s.current > 0)

    cycles = sorted({s.cycle for s in samples if flowing(s)})
    if not cycles:
        return []
    chosen = cycles[-1] if cycle is None else cycle
    half = [s for s in samples if s.cycle == chosen and flowing(s)]
    if not half:
        return []
    median = sorted(abs(s.current) for s in half)[len(half) // 2]
    points = sorted((s.voltage, s.discharge_ah if discharge else s.charge_ah)
                    for s in half if abs(abs(s.current) - median) <= 0.02 * median)
    if len(points) < 3 or points[-1][0] - points[0][0] < window * bin_v:
        return []
    vs, qs = [v for v, _ in points], [q for _, q in points]
    grid = [vs[0] + k * bin_v for k in range(int((vs[-1] - vs[0]) / bin_v) + 1)]
    q = [_interp(vs, qs, v) for v in grid]
    slope = savgol_filter(q, window_length=min(window, len(q) - (1 - len(q) % 2)), polyorder=2, deriv=1,
                          delta=bin_v)
    return [(v, abs(float(d))) for v, d in zip(grid, slope, strict=True)]


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    k = bisect.bisect_left(xs, x)
    if k <= 0:
        return ys[0]
    if k >= len(xs):
        return ys[-1]
    x0, x1 = xs[k - 1], xs[k]
    return ys[k - 1] + (ys[k] - ys[k - 1]) * ((x - x0) / (x1 - x0) if x1 != x0 else 0.0)


def unix_time_problem(times: Iterable[float | None]) -> str | None:
    """One line when a run's Unix time goes backwards anywhere (its samples in recorded order), else None.

    Test time is the run's own; Unix time is what a lab lines up with its other records, so a step back (a
    controller's clock that moved, a file stitched from two machines) is said wherever the run is read.
    """
    backwards, worst, first_at, previous = 0, 0.0, 0, None
    for row, t in enumerate(times, 1):
        if t is None:
            continue
        if previous is not None and t < previous:
            backwards += 1
            if backwards == 1:
                first_at = row
            worst = max(worst, previous - t)
        previous = t
    if not backwards:
        return None
    return (f"Unix time goes backwards {backwards} time(s) in this run, by up to {worst:.3f} s (first at data "
            f"point {first_at}): its wall-clock stamps cannot be trusted there")
