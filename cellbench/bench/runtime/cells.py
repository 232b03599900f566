"""The cell on a channel, as the bench file describes it: what C-rates and the safety window refer to."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from cellbench.profiles.base import Strict
from cellbench.profiles.units import Voltage as Voltage  # the bench file's fields, checked by config.py
from cellbench.profiles.units import to_si

Capacity = Annotated[float, BeforeValidator(lambda v: to_si(v, "A*h", "a capacity (e.g. '3.5 mAh')"))]
Area = Annotated[float, BeforeValidator(lambda v: to_si(v, "cm**2", "an area (e.g. '1 cm^2')"))]
Length = Annotated[float, BeforeValidator(lambda v: to_si(v, "mm", "a length (e.g. '10 mm')"))]
Mass = Annotated[float, BeforeValidator(lambda v: to_si(v, "g", "a mass (e.g. '12.5 mg')"))]
Loading = Annotated[float, BeforeValidator(lambda v: to_si(v, "mg/cm**2", "an areal loading (e.g. '20 mg/cm^2')"))]
Density = Annotated[float, BeforeValidator(lambda v: to_si(v, "A/cm**2", "a current density (e.g. '1 mA/cm^2')"))]
LITHIUM_METAL_CCD = 2.5e-3  # A/cm²: the most any Li | argyrodite cell is reported to cycle stably (80 °C, 5 MPa)
Label = Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]

class CellConfig(Strict):
    """The cell on a channel: what the profile's C-rates and the safety limits refer to."""

    what: ClassVar[str] = "cell key"
    id: Label | None = Field(default=None, description="the cell's ID as labelled (by default its key in the file)")
    batch: str | None = Field(default=None, description="the cell's batch (filters, reports, the lab database)")
    chemistry: str = Field(default="NMC811 | Li6PS5Cl | Li metal",
                           description="cathode / electrolyte / anode; a lithium-metal anode gets a charge-current "
                                       "density limit")
    capacity: Capacity = Field(description="nominal capacity in Ah")
    voltage_min: Voltage = Field(description="the lowest voltage the cell may see (V); the safe window is 0.2 V below")
    voltage_max: Voltage = Field(description="the highest voltage the cell may see (V); the safe window is 0.1 V "
                                             "above")
    area: Area = Field(default=1.0, gt=0, description="active (cathode) area in cm²")
    mass: Mass | None = Field(default=None, gt=0, description="active material mass in g")
    loading: Loading | None = Field(default=None, gt=0, description="active material loading in mg/cm²")
    dimensions: tuple[Length, Length, Length] | None = Field(
        default=None, description="length, width, thickness in mm (energy density; swelling under the press)")
    max_charge_current_density: Density | None = Field(
        default=None, gt=0, description="the densest charging current the cell takes (A/cm²); a lithium-metal "
                                        "cell whose area is written defaults to 2.5 mA/cm², other cells have none")

    @property
    def lithium_metal(self) -> bool:
        """Whether the anode is lithium metal (the last part of the chemistry: 'Li', 'Li metal', ...)."""
        anode = self.chemistry.split("|")[-1].strip().lower()
        return anode in ("li", "lithium") or anode.startswith(("li metal", "lithium metal", "li foil"))

    @property
    def charge_density_limit(self) -> float | None:
        """A/cm²: the cell's own limit, or the lithium-metal default where its area is written (the 1 cm² default
        area of a cell that names none would make every pouch cell's current look dense)."""
        if self.max_charge_current_density is not None:
            return self.max_charge_current_density
        return LITHIUM_METAL_CCD if self.lithium_metal and "area" in self.model_fields_set else None

    @property
    def active_mass_g(self) -> float | None:
        """The active mass as written, or from the loading over the area."""
        if self.mass is not None:
            return self.mass
        return self.loading * self.area / 1000.0 if self.loading is not None else None

    @property
    def volume_cm3(self) -> float | None:
        if self.dimensions is None:
            return None
        x, y, z = self.dimensions
        return x * y * z / 1000.0

    def as_written(self) -> dict[str, Any]:
        """The cell as a bench file would write it (with units), so that it validates again."""
        out: dict[str, Any] = {"chemistry": self.chemistry, "capacity": f"{self.capacity!r} A*h",
                               "voltage_min": f"{self.voltage_min!r} V", "voltage_max": f"{self.voltage_max!r} V",
                               "area": f"{self.area!r} cm**2"}
        for key, value in (("id", self.id), ("batch", self.batch)):
            if value is not None:
                out[key] = value
        if self.mass is not None:
            out["mass"] = f"{self.mass!r} g"
        if self.loading is not None:
            out["loading"] = f"{self.loading!r} mg/cm**2"
        if self.dimensions is not None:
            out["dimensions"] = [f"{d!r} mm" for d in self.dimensions]
        if self.max_charge_current_density is not None:
            out["max_charge_current_density"] = f"{self.max_charge_current_density!r} A/cm**2"
        return out

    @model_validator(mode="after")
    def _window(self) -> CellConfig:
        if self.voltage_min >= self.voltage_max:
            raise PydanticCustomError("window", "voltage_min must be below voltage_max", {})
        return self
