"""Parameters of the simulated solid-state cell, in one place, each with its source.

NMC811 cathode | Li6PS5Cl (argyrodite) electrolyte | lithium-metal anode. Values come from the
team's sourced table (``cell-parameters.md``); ``(est.)`` marks an order-of-magnitude estimate
that still needs a citation before anyone quotes it.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

# OCV of NMC811 vs Li/Li+ at 25 degC; Sturm et al., JPS 412, 204 (2019), via PyBaMM's
# nmc811_18650_ocp_Zhuo2023.csv, SOC 0 -> stoichiometry 1.000, SOC 1 -> 0.2157 (4.30 V).
OCV_SOC = tuple(i / 20 for i in range(21))
OCV_V = (
    3.024, 3.557, 3.576, 3.601, 3.633, 3.667, 3.697, 3.725, 3.751, 3.778, 3.810,
    3.854, 3.906, 3.957, 4.001, 4.047, 4.103, 4.158, 4.183, 4.211, 4.300,
)
# Entropic coefficient dU/dT, same source (nmc811_18650_dUdT_Zhuo2023.csv). PyBaMM labels the
# column V/K; the values only make physical sense as mV/K, which is how they are used here.
DUDT_SOC = (0.0, 0.03, 0.06, 0.17, 0.37, 0.52, 0.64, 0.78, 0.92, 1.0)
DUDT_MV_PER_K = (-0.074, -0.074, -0.055, -0.018, -0.034, 0.006, -0.008, 0.022, 0.037, 0.015)


def _lfp_ocp(sto: float) -> float:
    """LiFePO4 open-circuit potential vs Li/Li+ at lithium fraction `sto`: Afshar, Morris & Khajepour,
    arXiv 1709.03970 (2017), as PyBaMM's LFP_ocp_Afshar2017 gives it."""
    return 3.4077 - 0.020269 * sto + 0.5 * math.exp(-150.0 * sto) - 0.9 * math.exp(-30.0 * (1.0 - sto))


# SOC 0 -> lithium fraction 0.995, SOC 1 -> 0.005 (the window is an estimate); denser at the steep ends.
LFP_OCV_SOC = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
LFP_OCV_V = tuple(round(_lfp_ocp(0.995 - 0.99 * soc), 4) for soc in LFP_OCV_SOC)

# The slowest relaxation mode of diffusion in a sphere decays with R^2 / (mu1^2 D), mu1 = 4.4934 the first
# root of tan(x) = x; under a constant current the surface runs ahead of the bulk by (dSOC/dt) R^2 / (15 D)
# (the parabolic profile of Subramanian et al., JES 152, A2002 (2005)).
SPHERE_SLOWEST_MODE = 4.4934**2
SPHERE_STEADY_LAG = 15.0


class AnodeFilm(BaseModel):
    """A protective film on the lithium anode, as a mechanism: how it changes the Li|SE interface.

    Default: the Li3N (Li+ conductor) + Li2O (strong) film of a LiNO3/nitromethane/DME dip, which first
    removes the native film (SK On + Hanyang, ACS Energy Lett. 2025: >300 cycles vs ~100 at RT). No CCD or
    resistance was published with it; the factors follow the protected-Li layers of cell-parameters.md 10.4
    (Li-Ag with LiF/Li2O/Li3N: 1.6 mA/cm2; Li3Sb/LiF: 1.8; the notes' 1.0 mA/cm2 for protected Li).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "Li3N/Li2O"
    r_ct_li_factor: float = Field(0.5, gt=0, description="on the Li|SE charge transfer: the native film gone (est.)")
    ccd_factor: float = Field(3.3, gt=0, description="on the critical current density: 0.3 -> 1.0 mA/cm2 (est.)")
    dendrite_capacity_factor: float = Field(3.0, gt=0, description="lithium a filament takes through the film (est.)")
    anode_fade_factor: float = Field(0.1, ge=0, description="on the fade at the Li|SE interface (est.)")


LI3N_FILM = AnodeFilm()


class CellParameters(BaseModel):
    """Everything the equivalent-circuit model needs; areal values are per cm² of active area."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "pellet"
    chemistry: str = "NMC811 | Li6PS5Cl | Li metal"
    capacity_ah: float = Field(3.5e-3, gt=0, description="nominal capacity: 3.5 mAh/cm² × area")
    area_cm2: float = Field(1.0, gt=0, description="active (cathode) area")
    dimensions_mm: tuple[float, float, float] = (10.0, 10.0, 0.6)
    v_min: float = 2.5
    v_max: float = 4.3
    # cathode OCV and its entropic coefficient (the OCV is tabulated at 25 degC)
    ocv_soc: tuple[float, ...] = OCV_SOC
    ocv_v: tuple[float, ...] = OCV_V
    dudt_soc: tuple[float, ...] = DUDT_SOC
    dudt_mv_per_k: tuple[float, ...] = DUDT_MV_PER_K
    t_ref_k: float = Field(298.15, description="where the resistances, CCD and fade below are quoted")
    p_ref_mpa: float = 5.0
    # Solid electrolyte: R = L/sigma; 0.5 mm at 2.0 mS/cm -> 25 Ω·cm² (Yan 2026; Liu AEM 2022).
    r_se_ohm_cm2: float = 25.0
    ea_se_ev: float = 0.35  # Kraft JACS 2017; Hanghofer 2019 (est.)
    r_contact_ohm_cm2: float = 2.0  # (est.)
    # Interfaces at 5 MPa, scaled by (P/5 MPa)^-0.5 (arXiv 2501.00600).
    r_ct_cathode_ohm_cm2: float = 30.0  # coated NMC811 after formation (est.)
    ea_ct_cathode_ev: float = 0.5  # (est.)
    r_ct_li_ohm_cm2: float = 10.0  # Spencer-Jolly ACS AMI 13, 22708 (2021) range (est.)
    ea_ct_li_ev: float = 0.4  # (est.)
    # The two interface arcs (cell-parameters.md, EIS shape): constant-phase elements, all est. Each arc
    # relaxes in the time domain with its own time constant (R Q)^(1/n): 5.2 ms (cathode), 17 us (Li).
    q_cathode_f_cm2: float = 5.0e-4
    n_cathode: float = 0.8
    q_li_f_cm2: float = 5.0e-6
    n_li: float = 0.9
    # Solid-state diffusion in the cathode particles: NMC811 (LG M50) R = 5.22 um, D = 4e-11 cm2/s
    # (PyBaMM Chen2020): R^2/D = 6.8e3 s, the slowest mode ~340 s, a 1C surface lead of 0.13 in SOC. Its
    # impedance is a finite Warburg whose coefficient follows (0.7 Ohm cm2 s^-1/2, inside 0.4-4).
    particle_radius_um: float = Field(5.22, gt=0)
    diffusivity_cm2_s: float = Field(4e-11, gt=0)
    pressure_exponent: float = -0.5  # arXiv 2501.00600
    p_floor_mpa: float = 0.05  # below this the stack is taken as having lost contact
    # Fade: 150 equivalent full cycles to 80 % for Li foil at 25 degC and C/10 (SK On release; Doux 2020),
    # faster when warmer (Arrhenius, Ea 0.3 eV: the low end of 0.3-0.5 eV, est.), at higher rates (each C of
    # rate adds its own share, est.) and below the reference pressure (lost contact). Most of a bare lithium
    # cell's fade is at the Li|SE interface (est.): a protective film acts on that share.
    cycles_to_80pct: float = 150.0
    fade_ea_ev: float = 0.3
    fade_per_c_rate: float = 1.0
    fade_ref_c_rate: float = 0.1
    anode_fade_share: float = Field(0.75, ge=0, le=1)
    anode_film: AnodeFilm | None = None
    # First charge of a fresh cell: part of the charge builds the interphases (CEI on NMC, SEI on Li)
    # instead of storing lithium. This fraction of the first charge, up to that fraction of the capacity,
    # is lost, so a full first cycle's efficiency is 1 / (1 + fraction): 0.15 gives 87 %, inside the
    # 80-88 % of LiNbO3-coated NCM811 | Li6PS5Cl cells (shared cell-parameters.md, 10.1; the irrecoverable
    # part from SE oxidation and cathode/SE reactions: Chem. Eng. J. 527, 171807 (2026)).
    formation_loss_fraction: float = 0.15
    # Interphase growth with ageing (Koerver Chem. Mater. 2017): the interfacial resistance grows as
    # capacity is lost; 5 × the lost fraction doubles it by 80 % retention (est.).
    r_growth_per_lost_fraction: float = 5.0
    # Lithium dendrite: critical current density at 25 degC and 5 MPa (Spencer-Jolly 2021),
    # rising with temperature (Ea fitted to its 60->80 degC points), proportional to P in 1-5 MPa and
    # as sqrt(P) above (est.: better contact still helps, less and less).
    ccd_ma_cm2: float = 0.3
    ccd_ea_ev: float = 0.35
    ccd_exponent_above_ref: float = 0.5
    # Above ~20-25 MPa lithium creeps into the electrolyte's pores and shorts the cell (cell-parameters.md,
    # Doux 2020: shorts at 25/75 MPa; flag Li-foil cells above about 20 MPa). A creeping filament grows with
    # the pressure above the onset, charging or not: 2e-4 mAh/cm2 per hour and MPa soft-shorts the pellet
    # about a day after it is pressed at 25 MPa (est.).
    creep_onset_mpa: float = 20.0
    creep_mah_cm2_h_per_mpa: float = 2e-4
    dendrite_capacity_mah_cm2: float = 0.05  # Li plated above the CCD before a short forms (est.)
    short_ohm_cm2: float = 20.0  # resistance of a dendrite short (est.)
    # Before the hard short a first filament touches the cathode: a soft short (kΩ·cm²) that
    # leaks charge and flattens the charge curve, its resistance falling log-linearly to the hard
    # short's as the dendrite grows on (Reddy/Ning Nat. Mater. 2021 describe the soft stage; est.).
    soft_short_at: float = Field(0.5, gt=0, le=1)  # fraction of dendrite_capacity at which the soft short forms
    soft_short_ohm_cm2: float = 20000.0
    # Thermal: the pellet's die dominates (cell-parameters.md §Thermal): tau = C/hA ~ 2000 s.
    heat_capacity_j_k: float = 500.0
    heat_transfer_w_k: float = 0.25
    # Thickness change with state of charge: Li plating 4.85 µm per mAh/cm² (M/rho of Li), the
    # NMC811 composite shrinking about 0.4 µm per mAh/cm² on charge (Koerver EES 2018, est.).
    swell_um_per_mah_cm2: float = 4.85 - 0.4

    @property
    def volume_cm3(self) -> float:
        x, y, z = self.dimensions_mm
        return x * y * z / 1000.0

    @property
    def diffusion_time_s(self) -> float:
        """R^2 / D of the cathode particles."""
        return float((self.particle_radius_um * 1e-4) ** 2 / self.diffusivity_cm2_s)


PELLET = CellParameters()

# The same pellet with a protected lithium anode: what the film changes is the mechanism above, so the
# cycle-life ratio to the bare pellet comes out of a run, not out of a number here.
PELLET_PROTECTED = PELLET.model_copy(update={"name": "pellet-protected", "anode_film": LI3N_FILM,
                                              "chemistry": "NMC811 | Li6PS5Cl | Li metal (Li3N/Li2O film)"})

POUCH = CellParameters(
    name="pouch",
    chemistry="NMC811 | Li6PS5Cl | Li metal (Li3N/Li2O film)",
    capacity_ah=5.0,
    area_cm2=1190.0,  # 20 cathode faces × 59.5 cm²
    dimensions_mm=(90.0, 75.0, 3.5),
    r_se_ohm_cm2=3.0,  # 30 µm sheet at 1.0 mS/cm
    r_contact_ohm_cm2=12.0,  # contact plus cathode ionic resistance, 10 + 2 Ω·cm² (est.)
    r_ct_li_ohm_cm2=20.0,  # the film halves it back to the design check's 10 Ω·cm² (est.)
    anode_film=LI3N_FILM,  # protected Li (design check: 450 cycles, CCD 1.0 mA/cm²)
    heat_capacity_j_k=48.0,  # 50 g × 0.95 J/g/K
    heat_transfer_w_k=0.11,  # bare pouch, tau ~ 440 s
)

# LFP | PEO-LLZTO-type polymer-oxide composite | Li metal, operated warm (60-80 degC), the other family of
# the pilot line. Quoted at 60 degC. PEO oxidises above ~3.8-4.05 V, so LFP and a 3.8 V ceiling.
POLYMER = CellParameters(
    name="polymer",
    chemistry="LFP | PEO-LLZTO composite | Li metal",
    capacity_ah=1.5e-3,  # 1.5 mAh/cm², a usual LFP loading for polymer cells (est.)
    dimensions_mm=(10.0, 10.0, 0.2),
    v_min=2.5,
    v_max=3.8,
    ocv_soc=LFP_OCV_SOC,
    ocv_v=LFP_OCV_V,
    dudt_soc=(0.0, 1.0),
    dudt_mv_per_k=(0.0, 0.0),  # no sourced entropic coefficient: taken as zero (est.)
    t_ref_k=333.15,
    # PEO + 10 % LATP: 1.9e-4 S/cm at 60 degC (Khatua 2026); a 50 µm membrane -> 26 Ω·cm² (est. thickness).
    # Apparent Ea 0.5 eV (VTF-type above the melt, 0.3-0.6 eV, est.): ×8 at 25 degC, where PEO crystallises.
    r_se_ohm_cm2=26.0,
    ea_se_ev=0.5,
    r_ct_cathode_ohm_cm2=40.0,  # (est.)
    r_ct_li_ohm_cm2=20.0,  # (est.)
    # a soft polymer wets its electrodes: little stack pressure, weakly felt (est.)
    p_ref_mpa=0.2,
    pressure_exponent=-0.2,
    p_floor_mpa=0.01,
    # LFP nanoparticles: R 0.1 µm, D 1e-13 cm²/s (est.): R²/D = 1000 s
    particle_radius_um=0.1,
    diffusivity_cm2_s=1e-13,
    # LFP 86.8 % after 150 cycles at 1C, 60 degC (Khatua 2026): 227 cycles to 80 % at 1C, ~375 at C/10
    cycles_to_80pct=375.0,
    formation_loss_fraction=0.05,  # LFP forms little interphase; PEO is stable below 3.8 V (est.)
    ccd_ma_cm2=0.5,  # PEO composites, 60 degC: 0.3-1 mA/cm² (est.)
)

PRESETS: dict[str, CellParameters] = {
    "pellet": PELLET, "pellet-protected": PELLET_PROTECTED, "pouch": POUCH, "polymer": POLYMER,
}
