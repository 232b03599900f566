"""Equivalent-circuit fits of impedance spectra, with impedance.py (the field's library).

The circuit is the solid-state cell's: ohmic resistance, the lithium | electrolyte arc and the
cathode arc (each R in parallel with a constant-phase element), and Warburg diffusion:
R0-p(R1,CPE1)-p(R2,CPE2)-W1. The interfacial resistance reported is R1 + R2.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

CIRCUIT = "R0-p(R1,CPE1)-p(R2,CPE2)-W1"
NAMES = ("R0", "R1", "CPE1_0", "CPE1_1", "R2", "CPE2_0", "CPE2_1", "W1")


@dataclass(frozen=True)
class EisFit:
    circuit: str
    r_ohmic: float
    r_interfacial: float
    parameters: dict[str, float]
    rel_rmse: float  # root-mean-square residual relative to |Z|: the fit's quality


def fit_spectrum(frequency: Sequence[float], z_real: Sequence[float], z_imag: Sequence[float]) -> EisFit:
    """Fit the cell's circuit to one spectrum (Z'' negative for capacitive behaviour); MissingExtra without the
    analysis extra."""
    from cellbench.bench.runtime.extras import need

    np = need("numpy", "an impedance fit")
    CustomCircuit = need("impedance.models.circuits", "an impedance fit").CustomCircuit

    f = np.asarray(frequency, dtype=float)
    z = np.asarray(z_real, dtype=float) + 1j * np.asarray(z_imag, dtype=float)
    order = np.argsort(f)[::-1]
    f, z = f[order], z[order]
    r0 = max(float(z.real[0]), 1e-6)
    span = max(float(z.real[-1]) - r0, 1e-6)
    best: tuple[float, list[float]] | None = None
    for q1, q2, split in ((1e-6, 1e-4, 0.25), (1e-5, 1e-3, 0.25), (1e-7, 1e-5, 0.5), (1e-5, 1e-3, 0.6)):
        guess = [r0, split * span, q1, 0.9, (1 - split) * span, q2, 0.8, max(span * 0.05, 1e-3)]
        circuit = CustomCircuit(CIRCUIT, initial_guess=guess)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                circuit.fit(f, z, bounds=([0, 0, 0, 0.3, 0, 0, 0.3, 0], [np.inf, np.inf, np.inf, 1, np.inf, np.inf, 1,
                                                                          np.inf]))
            except (RuntimeError, ValueError):
                continue
        predicted = circuit.predict(f)
        rmse = float(np.sqrt(np.mean(np.abs(predicted - z) ** 2 / np.abs(z) ** 2)))
        if best is None or rmse < best[0]:
            best = (rmse, list(map(float, circuit.parameters_)))
    if best is None:
        raise ValueError("the circuit could not be fitted to this spectrum")
    rmse, p = best
    params = dict(zip(NAMES, p, strict=True))
    return EisFit(CIRCUIT, p[0], p[1] + p[4], params, rmse if math.isfinite(rmse) else math.inf)
