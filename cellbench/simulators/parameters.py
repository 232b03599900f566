"""Parameters of the simulated solid-state cell, in one place, each with its source.

NMC811 cathode | Li6PS5Cl (argyrodite) electrolyte | lithium-metal anode. Values come from the
team's sourced table (``cell-parameters.md``); ``(est.)`` marks an order-of-magnitude estimate
that still needs a citation before anyone quotes it.
"""

from __future__ import annotations

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
    t_ref_k: float = 298.15
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
    c_dl_f_cm2: float = 5.0e-4  # cathode double layer (CPE n 0.8 taken as ideal) (est.)
    # Impedance spectrum (cell-parameters.md, EIS shape): constant-phase elements of the two arcs
    # and the Warburg coefficient of solid-state diffusion in the cathode (all est.).
    q_cathode_f_cm2: float = 5.0e-4
    n_cathode: float = 0.8
    q_li_f_cm2: float = 5.0e-6
    n_li: float = 0.9
    warburg_ohm_cm2_s_half: float = 1.0
    pressure_exponent: float = -0.5  # arXiv 2501.00600
    p_floor_mpa: float = 0.05  # below this the stack is taken as having lost contact
    # Fade: 150 equivalent full cycles to 80 % for Li foil at 25 degC (SK On release; Doux 2020).
    cycles_to_80pct: float = 150.0
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
    # rising with temperature (Ea fitted to its 60->80 degC points) and proportional to P in 1-5 MPa.
    ccd_ma_cm2: float = 0.3
    ccd_ea_ev: float = 0.35
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


PELLET = CellParameters()

POUCH = CellParameters(
    name="pouch",
    capacity_ah=5.0,
    area_cm2=1190.0,  # 20 cathode faces × 59.5 cm²
    dimensions_mm=(90.0, 75.0, 3.5),
    r_se_ohm_cm2=3.0,  # 30 µm sheet at 1.0 mS/cm
    r_contact_ohm_cm2=12.0,  # contact plus cathode ionic resistance, 10 + 2 Ω·cm² (est.)
    cycles_to_80pct=450.0,  # protected Li, 25 degC (SK On + Hanyang, ACS Energy Lett. 2025)
    ccd_ma_cm2=1.0,  # protected Li assumed (est.)
    heat_capacity_j_k=48.0,  # 50 g × 0.95 J/g/K
    heat_transfer_w_k=0.11,  # bare pouch, tau ~ 440 s
)

PRESETS: dict[str, CellParameters] = {"pellet": PELLET, "pouch": POUCH}
