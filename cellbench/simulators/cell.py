"""Equivalent-circuit model of a solid-state cell with a lithium-metal anode.

V = OCV(surface SOC, T) + I·R0 + V_li + V_cat, current positive on charge (the Battery Data Format's sign).
R0 is the electrolyte (Arrhenius in T) plus contact (power law in stack pressure). Each interface (Li|SE,
cathode|SE) is an RC whose time constant is its impedance arc's, (R·Q)^(1/n). Diffusion in the cathode
particles lets the surface run ahead of the bulk: its lead relaxes with the sphere's slowest mode (minutes)
and reaches (dSOC/dt)·R²/(15 D) under a steady current, so a fast discharge reaches the cut-off with
lithium left in the bulk and a cell keeps relaxing minutes after a pulse. Charge is counted coulombically;
capacity fades with throughput, faster when warm, at high rate and under low stack pressure, mostly at the
Li|SE interface (where a protective film acts). Plating above the critical current density, or lithium
creeping into the electrolyte under high stack pressure, grows a dendrite that first touches as a soft
short (a high, falling leak resistance) and ends in a hard one. The model is deterministic.
"""

from __future__ import annotations

import bisect
import cmath
import math
from dataclasses import dataclass

from cellbench.simulators.parameters import (
    PELLET,
    SPHERE_SLOWEST_MODE,
    SPHERE_STEADY_LAG,
    CellParameters,
)

TIME_EPS = 1e-6  # s: simulators integrate up to this close to now; past 2^24 s a float cannot add 4 ns

BOLTZMANN_EV = 8.617333262e-5
KELVIN = 273.15
OCV_T_REF_C = 25.0  # the OCV tables are at 25 degC; dU/dT moves them
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
    v_li: float = 0.0  # across the Li|SE interface's RC
    v_cat: float = 0.0  # across the cathode|SE interface's RC
    surface_lead: float = 0.0  # surface SOC of the cathode particles minus the bulk's (diffusion)
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
        self._r = (0.0, 0.0, 0.0, 0.0, 0.0)  # R0, R_li, R_cat, tau_li, tau_cat
        self._r_now: tuple[float, float, float] | None = None  # (T, P, capacity) the last call saw
        self._decay_key: tuple[float, float, float] | None = None
        self._decay = (0.0, 0.0, 0.0)
        # diffusion: the lead relaxes with tau_diff and reaches lag_s * dSOC/dt under a steady current
        self._tau_diff = params.diffusion_time_s / SPHERE_SLOWEST_MODE
        self._lag_s = params.diffusion_time_s / SPHERE_STEADY_LAG
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
        """Open-circuit voltage at the present SOC and temperature: where the cell relaxes to."""
        return self._ocv_at(self.state.soc)

    def _ocv_at(self, soc: float) -> float:
        p = self.params
        v = interpolate(p.ocv_soc, p.ocv_v, soc)
        if soc < 0.0:
            v += OVERRUN_SLOPE_V * soc
        elif soc > 1.0:
            v += OVERRUN_SLOPE_V * (soc - 1.0)
        dudt = interpolate(p.dudt_soc, p.dudt_mv_per_k, soc) * 1e-3
        v += dudt * (self.temperature_c - OCV_T_REF_C)
        return max(v, 0.0)  # an emptied (or shorted) cell sits at 0 V; it does not reverse

    def _ocv_slope(self, soc: float) -> float:
        """dOCV/dSOC (V per unit SOC) of the table's segment at soc, or of the overrun beyond it."""
        xs, ys = self.params.ocv_soc, self.params.ocv_v
        if soc < xs[0] or soc > xs[-1]:
            return OVERRUN_SLOPE_V
        k = min(max(bisect.bisect_right(xs, soc), 1), len(xs) - 1)
        return (ys[k] - ys[k - 1]) / (xs[k] - xs[k - 1])

    def _pressure_factor(self) -> float:
        p = max(self.pressure_mpa, self.params.p_floor_mpa)
        return float((p / self.params.p_ref_mpa) ** self.params.pressure_exponent)

    def _resistances(self) -> tuple[float, float, float, float, float]:
        """(ohmic, Li|SE, cathode|SE) in ohms and the two interfaces' time constants in s, recomputed only
        when temperature, pressure or ageing change."""
        now = (self.temperature_c, self.pressure_mpa, self.state.capacity_ah)
        if now == self._r_now:  # nothing moved since the last call (several per step)
            return self._r
        self._r_now = now
        key = (round(self.temperature_c, 2), round(self.pressure_mpa, 4), round(self._ageing(), 4))
        if self._r_key != key:
            p, t_k = self.params, self.temperature_c + KELVIN
            r_se = p.r_se_ohm_cm2 * arrhenius(p.ea_se_ev, t_k, p.t_ref_k)
            r_contact = p.r_contact_ohm_cm2 * self._pressure_factor()
            scale = self._pressure_factor() * self._ageing() / p.area_cm2
            film = p.anode_film.r_ct_li_factor if p.anode_film is not None else 1.0
            r_cat = p.r_ct_cathode_ohm_cm2 * arrhenius(p.ea_ct_cathode_ev, t_k, p.t_ref_k) * scale
            r_li = p.r_ct_li_ohm_cm2 * film * arrhenius(p.ea_ct_li_ev, t_k, p.t_ref_k) * scale
            # an arc R || CPE(Q, n) peaks at 1 / (2 pi (R Q)^(1/n)): its relaxation time
            tau_li = (r_li * p.q_li_f_cm2 * p.area_cm2) ** (1.0 / p.n_li)
            tau_cat = (r_cat * p.q_cathode_f_cm2 * p.area_cm2) ** (1.0 / p.n_cathode)
            self._r = ((r_se + r_contact) / p.area_cm2, r_li, r_cat, tau_li, tau_cat)
            self._r_key = key
        return self._r

    def ohmic_resistance(self) -> float:
        """Electrolyte plus contact resistance in ohms."""
        return self._resistances()[0]

    def interfacial_resistance(self) -> float:
        """Charge-transfer resistance of the cathode and lithium interfaces in ohms."""
        r = self._resistances()
        return r[1] + r[2]

    def time_constants(self) -> tuple[float, float, float]:
        """(Li|SE, cathode|SE, diffusion) relaxation times in s."""
        r = self._resistances()
        return r[3], r[4], self._tau_diff

    def diffusion_resistance(self) -> float:
        """What diffusion adds to the resistance under a steady current, in ohms, at the present SOC."""
        return self._ocv_slope(self.surface_soc) * self._lag_s / (self.state.capacity_ah * 3600.0)

    @property
    def surface_soc(self) -> float:
        """SOC at the surface of the cathode particles, which sets the voltage."""
        return self.state.soc + self.state.surface_lead

    def _ageing(self) -> float:
        """Factor on the interfacial resistance from interphase growth as the cell loses capacity."""
        lost = 1.0 - self.state.capacity_ah / self.params.capacity_ah
        return 1.0 + self.params.r_growth_per_lost_fraction * max(lost, 0.0)

    def interfacial_parts(self) -> tuple[float, float]:
        """(cathode, lithium) charge-transfer resistances in ohms."""
        r = self._resistances()
        return r[2], r[1]

    def impedance(self, frequency: float) -> complex:
        """Z(f): ohmic resistance, the Li|SE and cathode arcs (R in parallel with a CPE), and diffusion as a
        finite Warburg (R_d tanh(sqrt(j w T)) / sqrt(j w T), its slowest mode the time domain's)."""
        p = self.params
        w = 2 * math.pi * frequency
        r_cat, r_li = self.interfacial_parts()
        a = p.area_cm2
        z_li = 1 / (1 / r_li + p.q_li_f_cm2 * a * (1j * w) ** p.n_li)
        z_cat = 1 / (1 / r_cat + p.q_cathode_f_cm2 * a * (1j * w) ** p.n_cathode)
        root = cmath.sqrt(1j * w * self._tau_diff * math.pi**2 / 4)
        z_d = self.diffusion_resistance() * (cmath.tanh(root) / root if abs(root) < 20 else 1 / root)
        return self.ohmic_resistance() + z_li + z_cat + z_d

    def dc_resistance(self) -> float:
        """Resistance seen by a constant current once the interfaces have settled (a few ms), before
        diffusion builds up (minutes)."""
        r = self._resistances()
        return r[0] + r[1] + r[2]

    def critical_current_density(self) -> float:
        """Current density (mA/cm²) above which plating grows dendrites."""
        p, t_k = self.params, self.temperature_c + KELVIN
        pressure = max(self.pressure_mpa, 1.0) / p.p_ref_mpa
        contact = pressure if pressure <= 1.0 else pressure**p.ccd_exponent_above_ref
        film = p.anode_film.ccd_factor if p.anode_film is not None else 1.0
        return p.ccd_ma_cm2 / arrhenius(p.ccd_ea_ev, t_k, p.t_ref_k) * contact * film

    # --- dynamics --------------------------------------------------------------------------
    def _decays(self, dt: float) -> tuple[float, float, float]:
        """exp(-dt/tau) of the Li, cathode and diffusion branches (an instrument asks thevenin, then applies,
        for the same dt: computed once)."""
        tau_li, tau_cat, tau_d = self.time_constants()
        key = (dt, tau_li, tau_cat)
        if key != self._decay_key:
            self._decay_key = key
            self._decay = (math.exp(-dt / tau_li), math.exp(-dt / tau_cat), math.exp(-dt / tau_d))
        return self._decay

    def thevenin(self, dt: float) -> tuple[float, float]:
        """(E, R) such that the terminal voltage over the next dt is E + I·R for external current I."""
        r0, r_li, r_cat, _, _ = self._resistances()
        a_li, a_cat, a_d = self._decays(dt)
        st = self.state
        surface = st.soc + st.surface_lead * a_d
        # surface SOC per ampere at the end of dt: the bulk's own move and the lead's growth (the cut-off of an
        # emptying cell is on the OCV's steep end, where an interval's move alone is tens of mV)
        gain = (dt + self._lag_s * (1.0 - a_d)) / (st.capacity_ah * 3600.0)
        e = self._ocv_at(surface) + st.v_li * a_li + st.v_cat * a_cat
        r = r0 + r_li * (1.0 - a_li) + r_cat * (1.0 - a_cat) + self._ocv_slope(surface) * gain
        if st.short_ohm is not None:
            k = 1.0 + r / st.short_ohm
            e, r = e / k, r / k
        return e, r

    def apply_current(self, current: float, dt: float) -> float:
        """Pass an external current (A, + = charge) for dt seconds; return the terminal voltage."""
        e, r = self.thevenin(dt)
        voltage = e + current * r
        internal = current
        if self.state.short_ohm is not None:
            internal -= voltage / self.state.short_ohm
        _, r_li, r_cat, _, _ = self._resistances()
        a_li, a_cat, a_d = self._decays(dt)
        st = self.state
        st.v_li = st.v_li * a_li + internal * r_li * (1.0 - a_li)
        st.v_cat = st.v_cat * a_cat + internal * r_cat * (1.0 - a_cat)
        st.surface_lead = st.surface_lead * a_d + internal * self._lag_s / (st.capacity_ah * 3600.0) * (1.0 - a_d)
        ah = internal * dt / 3600.0
        stored = ah
        if ah > 0 and st.formation_left_ah > 0:  # a fresh cell's first charge forms its interphases
            lost = min(self.params.formation_loss_fraction * ah, st.formation_left_ah)
            st.formation_left_ah -= lost
            stored -= lost
        st.soc += stored / st.capacity_ah
        self._age(abs(ah), abs(internal))
        self._grow_dendrite(current, dt)  # the current pushed in drives plating at the filament tip
        self._heat(voltage, internal, dt)
        if current > 0:
            st.charged_ah += current * dt / 3600.0
        else:
            st.discharged_ah -= current * dt / 3600.0
        st.voltage, st.current = voltage, current
        return voltage

    def fade_stress(self, current: float) -> float:
        """How much faster than at the reference (t_ref, C/10, reference pressure, bare lithium) the cell
        loses capacity per ampere-hour passed at this current."""
        p = self.params
        warm = 1.0 / arrhenius(p.fade_ea_ev, self.temperature_c + KELVIN, p.t_ref_k)
        c_rate = current / p.capacity_ah
        rate = (1.0 + p.fade_per_c_rate * c_rate) / (1.0 + p.fade_per_c_rate * p.fade_ref_c_rate)
        contact = max(1.0, self._pressure_factor())  # lost contact speeds fade
        film = p.anode_film.anode_fade_factor if p.anode_film is not None else 1.0
        where = 1.0 - p.anode_fade_share + p.anode_fade_share * film
        return warm * rate * contact * where

    def _age(self, ah: float, current: float) -> float:
        """Capacity loss with throughput: 20 % over cycles_to_80pct equivalent full cycles at the reference."""
        p = self.params
        if ah == 0.0:
            return 0.0
        per_ah = 0.1 / p.cycles_to_80pct  # an equivalent full cycle passes 2 × capacity
        loss = per_ah * self.fade_stress(current) * ah
        st = self.state
        # cathode material loses contact (loss of active material); the lithium anode's excess keeps the
        # charge stored, so the cell holds less but what it holds is not lost with it
        before, st.capacity_ah = st.capacity_ah, max(st.capacity_ah - loss, 1e-3 * p.capacity_ah)
        st.soc *= before / st.capacity_ah
        st.throughput_ah += ah
        return loss

    def _dendrite_capacity(self) -> float:
        p = self.params
        return p.dendrite_capacity_mah_cm2 * (p.anode_film.dendrite_capacity_factor if p.anode_film else 1.0)

    def _grow_dendrite(self, current: float, dt: float) -> None:
        p = self.params
        if self.hard_shorted:
            return
        grown_mah_cm2 = 0.0
        if current > 0:  # lithium plates on the anode while the cell charges
            grown_mah_cm2 += max(current * 1e3 / p.area_cm2 - self.critical_current_density(), 0.0) * dt / 3600.0
        if self.pressure_mpa > p.creep_onset_mpa:  # and creeps into the electrolyte under a high stack pressure
            grown_mah_cm2 += p.creep_mah_cm2_h_per_mpa * (self.pressure_mpa - p.creep_onset_mpa) * dt / 3600.0
        if grown_mah_cm2 <= 0:
            return
        self.state.dendrite_mah_cm2 += grown_mah_cm2
        grown = self.state.dendrite_mah_cm2 / self._dendrite_capacity()
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
