"""From recorded samples to answers: the per-cycle table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bench.store import Sample


@dataclass(frozen=True)
class CycleSummary:
    cycle: int
    charge_ah: float
    discharge_ah: float
    charge_wh: float
    discharge_wh: float

    @property
    def coulombic_efficiency(self) -> float | None:
        """Discharge over charge of the same cycle; None when the cycle had no charge."""
        return self.discharge_ah / self.charge_ah if self.charge_ah > 0 else None

    @property
    def energy_efficiency(self) -> float | None:
        return self.discharge_wh / self.charge_wh if self.charge_wh > 0 else None


def cycle_table(samples: Iterable[Sample]) -> list[CycleSummary]:
    """One row per cycle; the accumulators restart each cycle, so a cycle's last sample holds its totals."""
    last: dict[int, Sample] = {}
    for s in samples:
        last[s.cycle] = s
    return [
        CycleSummary(c, s.charge_ah, s.discharge_ah, s.charge_wh, s.discharge_wh)
        for c, s in sorted(last.items())
    ]
