"""Bench configuration (bench.yaml): the instruments by resource string, the cells, and the channels binding them.

    name: bench-a
    instruments:
      smu1: {driver: keithley2450, resource: "TCPIP::127.0.0.1::5025::SOCKET", timeout: 5 s}
    cells:
      pellet-01: {capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V, area: 1 cm^2}
    channels:
      ch1: {cycler: smu1, cell: pellet-01}
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from cellbench.bench.ops.mqtt import MqttConfig
from cellbench.bench.runtime.cells import CellConfig
from cellbench.drivers.registry import InstrumentSettings, driver, drivers, settings_models
from cellbench.profiles.base import Strict
from cellbench.profiles.parse import read_text, validate_yaml
from cellbench.profiles.units import Duration


def _known_driver(data: Any) -> Any:
    """An instrument's entry names a registered driver (said with the known ones), whose model then reads it."""
    if isinstance(data, dict):
        known = ", ".join(sorted(drivers()))
        if "driver" not in data:
            raise PydanticCustomError("driver", "'driver' is required (one of: {known})", {"known": known})
        if data["driver"] not in drivers():
            raise PydanticCustomError("driver", "unknown driver '{name}' (expected one of: {known})",
                                      {"name": str(data["driver"]), "known": known, "key": "driver"})
    return data


if TYPE_CHECKING:
    InstrumentConfig = InstrumentSettings
else:  # each driver's own model of its entry, chosen by `driver:` (registry.settings_models)
    InstrumentConfig = Annotated[Annotated[Union[settings_models()], Field(discriminator="driver")],  # noqa: UP007
                                 BeforeValidator(_known_driver)]


def instrument(**settings: Any) -> InstrumentSettings:
    """An instrument's entry read by its driver's model (`driver=` names it), as from a bench file."""
    _known_driver(settings)
    tag: Any = Literal[settings["driver"]]
    (model,) = [m for m in settings_models() if m.model_fields["driver"].annotation == tag]
    return model.model_validate(settings)


class ChannelConfig(Strict):
    """A cell and the instruments acting on it; several channels may share a chamber or a press."""

    what: ClassVar[str] = "channel key"
    cycler: str = Field(description="the instrument (its key under `instruments:`) that sources the cell's current")
    cycler_channel: int | None = Field(default=None, ge=0, description="the channel of a multi-channel cycler "
                                                                        "(0-based, as on its wire)")
    cell: str = Field(description="the cell (its key under `cells:`) on this channel")
    profile: str | None = Field(default=None, description="this channel's own profile: a file (relative to the "
                                                          "bench file) or a library name")
    chamber: str | None = Field(default=None, description="the temperature chamber the cell is in, if any")
    press: str | None = Field(default=None, description="the press (or load cell) holding the cell's stack pressure")
    potentiostat: str | None = Field(default=None, description="the potentiostat for the profile's EIS steps")

    @property
    def instruments(self) -> list[str]:
        """The names of the instruments the channel uses, cycler first."""
        return [r for r in (self.cycler, self.chamber, self.press, self.potentiostat) if r is not None]


class BenchConfig(Strict):
    """A bench: its instruments, its cells, the channels binding them, and how it reports."""

    what: ClassVar[str] = "bench key"
    name: str = Field(default="bench", description="the bench's name (in run records, MQTT topics, `status`)")
    operator: str | None = Field(default=None, description="who runs the tests (the CLI's --operator overrides)")
    comment: str | None = Field(default=None, description="free text kept with every run's record")
    notify: list[str] | None = Field(
        default=None, min_length=1, description="a command (program and arguments) run when a channel's run ends, "
                                                "with the run's state and reason as JSON on its standard input")
    instruments: dict[str, InstrumentConfig] = Field(description="each instrument by a name of your choosing")
    cells: dict[str, CellConfig] = Field(description="each cell by a name of your choosing (its ID by default)")
    channels: dict[str, ChannelConfig] = Field(min_length=1, description="each channel: a cell and the "
                                                                         "instruments acting on it")
    mqtt: MqttConfig | None = Field(default=None, description="telemetry and remote control through an MQTT "
                                                              "broker; off when absent")
    on_safety_stop: Literal["end", "hold"] = Field(
        default="end", description="end: a safety stop ends the channel's run, latched (`cellbench resume RUN "
                                   "--clear-latch` carries it on); hold: the channel waits, output off and latched, "
                                   "until an operator clears the latch and resumes it, or stops it (real bench only)")

    def sharing(self, instrument: str) -> list[str]:
        """The channels that name an instrument, in the bench file's order."""
        return [name for name, ch in self.channels.items() if instrument in ch.instruments]

    def held_area(self, press: str) -> float:
        """cm² under a press: the areas of the distinct cells of the channels it holds, side by side."""
        cells = dict.fromkeys(self.channels[name].cell for name in self.sharing(press))
        return sum(self.cells[c].area for c in cells if c in self.cells)

    def only(self, channel: str) -> BenchConfig:
        """The bench as one channel sees it: that channel, its cell and its instruments (what its run records,
        so that a run's metadata does not grow with the bench)."""
        ch = self.channels[channel]
        return self.model_copy(update={"instruments": {r: self.instruments[r] for r in ch.instruments},
                                       "cells": {ch.cell: self.cells[ch.cell]}, "channels": {channel: ch}})

    def cell_id(self, channel: str) -> str:
        """The ID of the channel's cell: its `id`, or its key in the bench file."""
        key = self.channels[channel].cell
        return self.cells[key].id or key

    def as_written(self) -> dict[str, Any]:
        """The bench as a bench file would write it (with units), so that `model_validate` takes it again."""
        return {
            "name": self.name,
            **{k: v for k, v in (("operator", self.operator), ("comment", self.comment), ("notify", self.notify))
               if v is not None},
            **({"on_safety_stop": self.on_safety_stop} if self.on_safety_stop != "end" else {}),
            **({"mqtt": {**self.mqtt.model_dump(mode="json", exclude_none=True),
                         "telemetry_every": f"{self.mqtt.telemetry_every!r} s"}} if self.mqtt else {}),
            "instruments": {n: i.as_written() for n, i in self.instruments.items()},
            "cells": {n: c.as_written() for n, c in self.cells.items()},
            "channels": {n: c.model_dump(mode="json", exclude_none=True) for n, c in self.channels.items()},
        }

    def reference_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Channels that name an instrument or a cell the bench does not have, or one of the wrong kind."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        sources: dict[tuple[str, int | None], str] = {}
        for name, ch in self.channels.items():
            source = (ch.cycler, ch.cycler_channel)
            box = self.instruments.get(ch.cycler)
            multi = box is not None and driver(box.driver).multi_channel
            if multi and ch.cycler_channel is None:
                problems.append((("channels", name), f"'{ch.cycler}' is a multi-channel cycler: say which of its "
                                 "channels with cycler_channel"))
            elif not multi and ch.cycler_channel is not None and box is not None:
                problems.append((("channels", name, "cycler_channel"), f"'{ch.cycler}' has one channel"))
            if source in sources:
                which = f"channel {ch.cycler_channel} of '{ch.cycler}'" if multi else f"'{ch.cycler}'"
                problems.append((("channels", name, "cycler"), f"{which} is already the cycler of channel "
                                 f"'{sources[source]}': one source cannot drive two cells"))
            sources.setdefault(source, name)
            if ch.cell not in self.cells:
                problems.append(
                    (("channels", name, "cell"),
                     f"'{ch.cell}' is not among the cells ({', '.join(self.cells) or 'none'})")
                )
            for role in ("cycler", "chamber", "press", "potentiostat"):
                ref = getattr(ch, role)
                if ref is None:
                    continue
                if ref not in self.instruments:
                    known = ", ".join(self.instruments) or "none"
                    problems.append(((("channels", name, role)), f"'{ref}' is not among the instruments ({known})"))
                elif role not in self.instruments[ref].roles:
                    inst = self.instruments[ref]
                    what = " or ".join(inst.roles)
                    problems.append((("channels", name, role), f"'{ref}' is a {what} ({inst.driver}), not a {role}"))
        for ref, inst in self.instruments.items():
            if (owner := inst.owner_channel) is not None and owner not in self.sharing(ref):
                problems.append((("instruments", ref, "owner"), f"'{owner}' is not a channel using '{ref}' "
                                 f"({', '.join(self.sharing(ref)) or 'none does'})"))
        return problems


def load_bench(path: str | Path) -> BenchConfig:
    p = Path(path)
    text = read_text(p, "bench file")
    bench = validate_yaml(text, p.name, BenchConfig, BenchConfig.reference_problems)
    beside = {name: ch.model_copy(update={"profile": str((p.parent / ch.profile).resolve())})
              for name, ch in bench.channels.items()  # a channel's profile file is found beside the bench file
              if ch.profile is not None and (p.parent / ch.profile).is_file()}
    return bench.model_copy(update={"channels": {**bench.channels, **beside}}) if beside else bench


def _type_of(annotation: Any) -> str:
    """A field's type as a reader of the bench file sees it (quantities by what they measure)."""
    import types
    import typing

    from cellbench.bench.runtime import cells
    named = {id(Duration): "duration", id(cells.Capacity): "capacity", id(cells.Area): "area",
             id(cells.Length): "length", id(cells.Mass): "mass", id(cells.Loading): "areal loading",
             id(cells.Density): "current density", id(cells.Voltage): "voltage"}
    if id(annotation) in named:
        return named[id(annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = dict.fromkeys(_type_of(a) for a in args if a is not type(None))  # a driver's models: one section
        return " or ".join(kinds) + " (optional)" * (type(None) in args)
    if origin is Annotated:
        return _type_of(args[0])
    if origin in (list, tuple):
        return f"a list of {_type_of(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of names to {_type_of(args[1])}"
    simple = {str: "text", int: "integer", float: "number", bool: "true or false", Path: "a file"}
    if annotation in simple:
        return simple[annotation]
    return f"the `{getattr(annotation, 'what', 'section').split()[0]}:` section" if hasattr(annotation, "what") \
        else str(getattr(annotation, "__name__", annotation))


def _quantity(metadata: list[Any]) -> str | None:
    """A required or defaulted quantity's kind, from the unit parser among the field's metadata."""
    import typing

    from cellbench.bench.runtime import cells
    for alias, name in ((Duration, "duration"), (cells.Capacity, "capacity"), (cells.Area, "area"),
                        (cells.Voltage, "voltage")):
        if any(m in metadata for m in typing.get_args(alias)[1:]):
            return name
    return None


def reference() -> str:
    """The bench-file reference (docs/bench-file.md): every key of every section from the models themselves, and
    every driver with its roles and settings. Regenerate with `python -m cellbench.bench.runner.config`."""
    import typing

    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    def keys(model: type[BaseModel], skip: frozenset[str] = frozenset()) -> list[str]:
        rows = ["| key | type | default | what it is |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if name in skip:
                continue
            if field.is_required():
                default = "**required**"
            elif field.default is PydanticUndefined or field.default is None:
                default = "-"
            else:
                default = f"`{field.default}`".replace("|", "\\|")
            kind = _quantity(field.metadata) or _type_of(field.annotation)
            said = (field.description or "").replace("|", "/").replace("\n", " ")
            rows.append(f"| `{name}` | {kind} | {default} | {said} |")
        return rows

    sections: list[tuple[str, type[BaseModel]]] = [
        ("the file", BenchConfig), ("`instruments:` (each)", InstrumentSettings), ("`cells:` (each)", CellConfig),
        ("`channels:` (each)", ChannelConfig), ("`mqtt:`", MqttConfig)]
    lines = ["# The bench file: every key", "",
             "Generated from the models that read it (`python -m cellbench.bench.runner.config > docs/bench-file.md`);",
             "quantities take units (`5 s`, `3.5 mAh`, `1 cm^2`). An unknown key is refused with its file and line.",
             ""]
    for title, model in sections:
        lines += [f"## {title}", "", (model.__doc__ or "").strip().replace("\n    ", " "), "", *keys(model), ""]
    lines += ["## Drivers", "", "`driver:` of an instrument, with the roles a channel may give it and its own keys "
              "(beside the common ones above; a key of another driver is refused).", "",
              "| driver | roles | what it is | serial baud | cycler channels | schedules on board |",
              "|---|---|---|---|---|---|"]
    for name, spec in sorted(drivers().items()):
        lines.append(f"| `{name}` | {', '.join(spec.roles)} | {spec.description} | {spec.baud_rate} | "
                     f"{'yes (`cycler_channel`)' if spec.multi_channel else '-'} | "
                     f"{'yes' if spec.runs_schedules else '-'} |")
    common = frozenset(InstrumentSettings.model_fields)
    for model in settings_models():
        name = typing.get_args(model.model_fields["driver"].annotation)[0]
        own = keys(model, common)
        lines += ["", f"### `{name}`", "", (model.__doc__ or "").strip().splitlines()[0], ""]
        lines += own if len(own) > 2 else ["No keys of its own."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
