"""Every registered driver fills the roles it claims: served by its own rehearsal (the simulator a simulated bench
stands in with, over a real loopback transport), opened through the registry as a bench opens it, and checked
against the role protocols the run-time relies on: a cycler (each channel of a box), a chamber, a press, a
potentiostat; a cycler that runs schedules also fills `OnBoard`."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from cellbench.bench.runner.config import instrument
from cellbench.drivers.registry import DriverSpec, drivers, rehearsal
from cellbench.roles import Chamber, Cycler, OnBoard, Potentiostat, Press
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.rehearsal import Rehearsal

ROLES: dict[str, Any] = {"cycler": Cycler, "chamber": Chamber, "press": Press, "potentiostat": Potentiostat}


def test_every_driver_has_a_rehearsal_and_claims_known_roles() -> None:
    specs = drivers()
    assert {"keithley2450", "espec", "modbus-press", "modbus-load-cell", "palmsens", "maccor", "arbin"} <= set(specs)
    for name, spec in specs.items():
        assert spec.rehearsal is not None and spec.roles and set(spec.roles) <= set(ROLES), name


@pytest.mark.parametrize("name", sorted(drivers()))
def test_a_driver_opened_on_its_rehearsal_fills_the_roles_it_claims(name: str) -> None:
    spec: DriverSpec = drivers()[name]

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        cells = [SolidStateCell(soc=0.5), SolidStateCell(soc=0.5)]
        async with contextlib.AsyncExitStack() as stack:
            served = await rehearsal(spec)(Rehearsal(cells, loop.time, stack))
            settings = instrument(driver=name, resource=served.resource, timeout="3 s", **served.settings)
            request = settings.request(f"{name}-1", 1.0)
            opened = await spec.open(request)
            try:
                assert opened.identity, "an instrument says what it is"
                found = []
                for role in spec.roles:
                    parts = [opened.driver.channel(n) for n in range(2)] if (
                        role == "cycler" and spec.multi_channel) else [opened.driver]
                    for part in parts:
                        assert isinstance(part, ROLES[role]), f"{name} does not fill {role}"
                        if role == "cycler":
                            assert isinstance(part, OnBoard) is spec.runs_schedules
                            reading = await part.measure()
                            assert 3.0 < reading.voltage < 4.3  # the simulated pellet, half charged
                    found.append(role)
                return found
            finally:
                await opened.close()

    assert asyncio.run(main()) == list(spec.roles)
