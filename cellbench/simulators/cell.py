"""Equivalent-circuit model of a sulfide solid-state cell with a lithium-metal anode.

V = OCV(SOC, T) + I·R0 + V_rc, current positive on charge (the Battery Data Format's sign).
R0 is the electrolyte (Arrhenius in T) plus contact (power law in stack pressure); the RC pair
is the interfacial charge-transfer resistance of both electrodes (Arrhenius and pressure law)
with the cathode double layer. Charge is counted coulombically; capacity fades with throughput,
faster under low stack pressure; plating above the critical current density grows a dendrite
that first touches as a soft short (a high, falling leak resistance) and ends in a hard one.
The model is deterministic: no randomness lives here.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from cellbench.simulators.parameters import (
    DUDT_MV_PER_K,
    DUDT_SOC,
    OCV_SOC,
    OCV_V,
    PELLET,
    CellParameters,
)

TIME_EPS = 1e-6  # s: simulators integrate up to this close to now; past 2^24 s a float cannot add 4 ns

BOLTZMANN_EV = 8.617333262e-5
KELVIN = 273.15
# Beyond the tabulated window the OCV is continued steeply so over-charge and over-discharge
# show as a voltage run-away rather than a flat line.
OVERRUN_SLOPE_V = 100.0  # V per unit SOC: the cathode cannot take more lithium than at SOC 0


def interpolate(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear interpolation, clamped at the ends."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    k = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def arrhenius(ea_ev: float, temperature_k: float, t_ref_k: float) -> float:
    """Factor by which a thermally activated resistance changes from t_ref to temperature."""
    return math.exp(ea_ev / BOLTZMANN_EV * (1.0 / temperature_k - 1.0 / t_ref_k))


@dataclass
class CellState:
    soc: float
    v_rc: float = 0.0
    capacity_ah: float = 0.0
    throughput_ah: float = 0.0
    charged_ah: float = 0.0  # external charge passed in, the model's own coulomb count
    discharged_ah: float = 0.0  # external charge taken out
    dendrite_mah_cm2: float = 0.0
    formation_left_ah: float = 0.0  # interphase still to form on the first charge
    short_ohm: float | None = None
    voltage: float = 0.0
    current: float = 0.0


class SolidStateCell:
    """One simulated cell; its environment (temperature, stack pressure) is set from outside."""

    def __init__(
        self,
        params: CellParameters = PELLET,
        *,
        soc: float = 0.0,
        temperature_c: float = 25.0,
        pressure_mpa: float | None = None,
    ) -> None:
        self.params = params
        self.temperature_c = temperature_c
        self.ambient_c = temperature_c  # the air around the cell; a chamber sets it
        self.pressure_mpa = params.p_ref_mpa if pressure_mpa is None else pressure_mpa
        self.state = CellState(soc=soc, capacity_ah=params.capacity_ah,
                               formation_left_ah=params.formation_loss_fraction * params.capacity_ah)
        self._r_key: tuple[float, float, float] | None = None
        self._r = (0.0, 0.0)
        self.state.voltage = self.ocv()

    # --- what the cell is ------------------------------------------------------------------
    @property
    def capacity_ah(self) -> float:
        return self.state.capacity_ah

    @property
    def soc(self) -> float:
        return self.state.soc

    @property
    def shorted(self) -> bool:
        """Any internal short, soft or hard."""
        return self.state.short_ohm is not None

    @property
    def hard_shorted(self) -> bool:
        """The dendrite has bridged the electrolyte for good: its resistance is the hard short's."""
        ohm = self.state.short_ohm
        return ohm is not None and ohm <= self.params.short_ohm_cm2 / self.params.area_cm2

    def ocv(self) -> float:
        """Open-circuit voltage at the present SOC and temperature."""
        soc = self.state.soc
        v = interpolate(OCV_SOC, OCV_V, soc)
        if soc < 0.0:
            v += OVERRUN_SLOPE_V * soc
        elif soc > 1.0:
            v += OVERRUN_SLOPE_V * (soc - 1.0)
        dudt = interpolate(DUDT_SOC, DUDT_MV_PER_K, soc) * 1e-3
        v += dudt * (self.temperature_c - (self.params.t_ref_k - KELVIN))
        return max(v, 0.0)  # an emptied (or shorted) cell sits at 0 V; it does not reverse

    def _pressure_factor(self) -> float:
        p = max(self.pressure_mpa, self.params.p_floor_mpa)
        return float((p / self.params.p_ref_mpa) ** self.params.pressure_exponent)

    def _resistances(self) -> tuple[float, float]:
        """(ohmic, interfacial) in ohms, recomputed only when temperature or pressure change."""
        key = (round(self.temperature_c, 2), round(self.pressure_mpa, 4), round(self._ageing(), 4))
        if self._r_key != key:
            p, t_k = self.params, self.temperature_c + KELVIN
            r_se = p.r_se_ohm_cm2 * arrhenius(p.ea_se_ev, t_k, p.t_ref_k)
            r_contact = p.r_contact_ohm_cm2 * self._pressure_factor()
            r_cat = p.r_ct_cathode_ohm_cm2 * arrhenius(p.ea_ct_cathode_ev, t_k, p.t_ref_k)
            r_li = p.r_ct_li_ohm_cm2 * arrhenius(p.ea_ct_li_ev, t_k, p.t_ref_k)
            interfaces = (r_cat + r_li) * self._pressure_factor() * self._ageing() / p.area_cm2
            self._r = ((r_se + r_contact) / p.area_cm2, interfaces)
            self._r_key = key
        return self._r

    def ohmic_resistance(self) -> float:
        """Electrolyte plus contact resistance in ohms."""
        return self._resistances()[0]

    def interfacial_resistance(self) -> float:
        """Charge-transfer resistance of the cathode and lithium interfaces in ohms."""
        return self._resistances()[1]

    def _ageing(self) -> float:
        """Factor on the interfacial resistance from interphase growth as the cell loses capacity."""
        lost = 1.0 - self.state.capacity_ah / self.params.capacity_ah
        return 1.0 + self.params.r_growth_per_lost_fraction * max(lost, 0.0)

    def interfacial_parts(self) -> tuple[float, float]:
        """(cathode, lithium) charge-transfer resistances in ohms."""
        p, t_k = self.params, self.temperature_c + KELVIN
        scale = self._pressure_factor() * self._ageing() / p.area_cm2
        return (p.r_ct_cathode_ohm_cm2 * arrhenius(p.ea_ct_cathode_ev, t_k, p.t_ref_k) * scale,
                p.r_ct_li_ohm_cm2 * arrhenius(p.ea_ct_li_ev, t_k, p.t_ref_k) * scale)

    def impedance(self, frequency: float) -> complex:
        """Z(f): ohmic resistance, the Li|SE and cathode arcs (R in parallel with a CPE), and Warburg diffusion."""
        p = self.params
        w = 2 * math.pi * frequency
        r_cat, r_li = self.interfacial_parts()
        a = p.area_cm2
        z_li = 1 / (1 / r_li + p.q_li_f_cm2 * a * (1j * w) ** p.n_li)
        z_cat = 1 / (1 / r_cat + p.q_cathode_f_cm2 * a * (1j * w) ** p.n_cathode)
        sigma = p.warburg_ohm_cm2_s_half / a
        return self.ohmic_resistance() + z_li + z_cat + sigma * (1 - 1j) / math.sqrt(w)

    def dc_resistance(self) -> float:
        """Steady-state resistance seen by a constant current."""
        return sum(self._resistances())

    def critical_current_density(self) -> float:
        """Current density (mA/cm²) above which plating grows dendrites."""
        p, t_k = self.params, self.temperature_c + KELVIN
        pressure = min(max(self.pressure_mpa, 1.0), p.p_ref_mpa)
        return p.ccd_ma_cm2 / arrhenius(p.ccd_ea_ev, t_k, p.t_ref_k) * pressure / p.p_ref_mpa

    # --- dynamics --------------------------------------------------------------------------
    def _rc_decay(self, dt: float) -> float:
        tau = self.interfacial_resistance() * self.params.c_dl_f_cm2 * self.params.area_cm2
        return math.exp(-dt / tau) if tau > 0 else 0.0

    def thevenin(self, dt: float) -> tuple[float, float]:
        """(E, R) such that the terminal voltage over the next dt is E + I·R for external current I."""
        r0, r_ct = self._resistances()
        a = self._rc_decay(dt)
        e = self.ocv() + self.state.v_rc * a
        r = r0 + r_ct * (1.0 - a)
        if self.state.short_ohm is not None:
            k = 1.0 + r / self.state.short_ohm
            e, r = e / k, r / k
        return e, r

    def apply_current(self, current: float, dt: float) -> float:
        """Pass an external current (A, + = charge) for dt seconds; return the terminal voltage."""
        e, r = self.thevenin(dt)
        voltage = e + current * r
        internal = current
        if self.state.short_ohm is not None:
            internal -= voltage / self.state.short_ohm
        a = self._rc_decay(dt)
        st = self.state
        st.v_rc = st.v_rc * a + internal * self.interfacial_resistance() * (1.0 - a)
        ah = internal * dt / 3600.0
        stored = ah
        if ah > 0 and st.formation_left_ah > 0:  # a fresh cell's first charge forms its interphases
            lost = min(self.params.formation_loss_fraction * ah, st.formation_left_ah)
            st.formation_left_ah -= lost
            stored -= lost
        st.soc += stored / st.capacity_ah
        self._age(abs(ah))
        self._grow_dendrite(current, dt)  # the current pushed in drives plating at the filament tip
        self._heat(voltage, internal, dt)
        if current > 0:
            st.charged_ah += current * dt / 3600.0
        else:
            st.discharged_ah -= current * dt / 3600.0
        st.voltage, st.current = voltage, current
        return voltage

    def _age(self, ah: float) -> float:
        """Capacity loss with throughput: 20 % over cycles_to_80pct equivalent full cycles."""
        p = self.params
        per_ah = 0.1 / p.cycles_to_80pct  # an equivalent full cycle passes 2 × capacity
        stress = max(1.0, self._pressure_factor())  # lost contact speeds fade
        loss = per_ah * stress * ah
        self.state.capacity_ah = max(self.state.capacity_ah - loss, 1e-3 * p.capacity_ah)
        self.state.throughput_ah += ah
        return loss

    def _grow_dendrite(self, current: float, dt: float) -> None:
        p = self.params
        if current <= 0 or self.hard_shorted:
            return  # lithium plates on the anode while the cell charges
        excess = current * 1e3 / p.area_cm2 - self.critical_current_density()
        if excess <= 0:
            return
        self.state.dendrite_mah_cm2 += excess * dt / 3600.0
        grown = self.state.dendrite_mah_cm2 / p.dendrite_capacity_mah_cm2
        if grown < p.soft_short_at:
            return
        # soft: from soft_short_ohm_cm2 when the filament touches, log-linearly down to the hard short
        x = min((grown - p.soft_short_at) / (1.0 - p.soft_short_at), 1.0) if p.soft_short_at < 1.0 else 1.0
        ohm_cm2 = p.soft_short_ohm_cm2 * (p.short_ohm_cm2 / p.soft_short_ohm_cm2) ** x
        ohm = ohm_cm2 / p.area_cm2
        if self.state.short_ohm is None or ohm < self.state.short_ohm:
            self.inject_short(ohm)

    def _heat(self, voltage: float, current: float, dt: float) -> None:
        """Follow the surrounding air with the cell's own lag, warmed by its losses (I·(V - OCV))."""
        p = self.params
        losses = abs(current * (voltage - self.ocv()))
        if self.state.short_ohm is not None:
            losses += voltage**2 / self.state.short_ohm
        # exactly, for losses and air held over dt: stable for any step (a long rest is integrated in few)
        settled = self.ambient_c + losses / p.heat_transfer_w_k
        self.temperature_c = settled + (self.temperature_c - settled) * math.exp(
            -dt * p.heat_transfer_w_k / p.heat_capacity_j_k)

    def thickness_change_um(self) -> float:
        """Swelling of the stack against its thickness at SOC 0: lithium plates on charge."""
        areal_mah = self.state.soc * self.state.capacity_ah * 1e3 / self.params.area_cm2
        return areal_mah * self.params.swell_um_per_mah_cm2

    def inject_short(self, resistance_ohm: float) -> None:
        """A lithium filament bridges the electrolyte: an internal resistance across the cell."""
        self.state.short_ohm = resistance_ohm

    def rest(self, dt: float) -> float:
        return self.apply_current(0.0, dt)
