"""The MQTT and simulator tool groups: mqtt check, sim serve."""


from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

# Everything else is imported where it is used: `cellbench --help` and a mistyped option stay fast.
if TYPE_CHECKING:

    pass

from cellbench.bench.faces.cli.common import PARENT_CHECK, CellOption, _bench, _fail, _preset, app, console, sim_app
from cellbench.bench.faces.cli.watching import (
    CaFileOption,
    PasswordFileOption,
    _broker_config,
    _simulated,
)

mqtt_app = typer.Typer(help="The MQTT side of a bench: telemetry and remote commands.", no_args_is_help=True,
                  rich_markup_mode=None)
app.add_typer(mqtt_app, name="mqtt")


@mqtt_app.command("check")
def mqtt_check(
    bench: Annotated[Path | None, typer.Option(help="the bench file whose 'mqtt:' section to check")] = None,
    broker: Annotated[str | None, typer.Option(help="or a broker URL, mqtt://user@host[:port][/prefix]")] = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    name: Annotated[str, typer.Option(help="with --broker: the bench name whose topics to check")] = "bench",
) -> None:
    """Whether these credentials can do what a bench does on the broker: connect, take commands, publish."""
    import asyncio

    from cellbench.bench.ops import mqtt
    if (bench is None) == (broker is None):
        raise _fail("give either --bench FILE or --broker URL")
    if bench is not None:
        cfg_bench = _bench(bench)
        if cfg_bench.mqtt is None:
            raise _fail(f"{bench}: the bench file has no 'mqtt:' section (telemetry is off)")
        cfg, name = cfg_bench.mqtt, cfg_bench.name
        try:
            cfg.password()
        except ValueError as exc:
            raise _fail(str(exc)) from None
    else:
        cfg = _broker_config(broker or "", password_file, ca_file)
    results = asyncio.run(mqtt.check(cfg, name))
    for what, ok, detail in results:
        mark = "[green]ok[/green]" if ok else "[red]no[/red]"
        console.print(f"{mark}  {what}: {detail}", highlight=False, soft_wrap=True)
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)


@sim_app.command("serve")
def sim_serve(
    instrument: Annotated[str, typer.Argument(help="which instrument: a driver name (keithley2450, espec, "
                                                   "modbus-press or press, modbus-load-cell or load-cell, "
                                                   "palmsens, maccor, arbin)")],
    port: Annotated[int | None, typer.Option(help="TCP port to listen on (0 picks a free one; default: the "
                                                  "instrument's own: 5025 for a 2450, 57570 for MacNet, 9031 for CTI, "
                                                  "5502 for a Modbus press or load cell)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    serial: Annotated[bool, typer.Option(help="serve on a pseudo-terminal serial line instead of TCP")] = False,
    cell: CellOption = "pellet",
    soc: Annotated[float, typer.Option(help="initial state of charge, 0 to 1")] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of the measurement noise")] = 0,
    channels: Annotated[int, typer.Option(min=1, max=128, help="channels of a multi-channel cycler box")] = 8,
    bin_port: Annotated[int, typer.Option(help="the binary-message port of a Maccor box (0 picks a free one)")]
    = 57560,
    login: Annotated[str, typer.Option(help="user:password the simulated Arbin cycler accepts")] = "admin:000000",
    temperature: Annotated[float, typer.Option(help="temperature of the simulated cell, degC")] = 25.0,
    fault: Annotated[list[str] | None, typer.Option(help="inject a fault into a line instrument: silent, garbage, "
                                                         "drop, stuck or delay=SECONDS (repeatable)")] = None,
    short_on_usr1: Annotated[float | None, typer.Option(help="a lithium short of this many ohms across the cell "
                                                              "when the server gets SIGUSR1 (kill -USR1 PID): "
                                                              "rehearse a short at a moment of your choosing")]
    = None,
    exit_with_parent: Annotated[bool, typer.Option(help="stop when the process that started it dies (a test "
                                                        "runner killed with -9 leaves no simulator behind)")]
    = False,
) -> None:
    """Serve a simulated instrument until interrupted, in real time, for any client."""
    import asyncio

    from cellbench.drivers.registry import simulator
    from cellbench.simulators.server import ServeOptions

    spec = _simulated(instrument)
    _preset(cell)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve_instrument = simulator(spec)
    port = int(spec.extra.get("port", 5025)) if port is None else port
    from cellbench.simulators.server import faults_of

    try:
        faults_of(tuple(fault or ()))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    options = ServeOptions(host=host, port=port, serial=serial, soc=soc, seed=seed, cell=cell, channels=channels,
                           bin_port=bin_port, login=login, temperature_c=temperature, faults=tuple(fault or ()),
                           short_on_usr1=short_on_usr1)

    async def serve() -> None:
        parent = os.getppid()
        async with serve_instrument(options) as where:
            console.print(f"serving {where}", highlight=False)
            if not exit_with_parent:
                await asyncio.Event().wait()
            # an orphan is adopted by another process: its parent is gone (no event says so: it is polled)
            while os.getppid() == parent:  # noqa: ASYNC110
                await asyncio.sleep(PARENT_CHECK)
            console.print(f"the process that started it (pid {parent}) is gone: stopped")

    try:
        asyncio.run(serve())
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror}", 1) from None
    except KeyboardInterrupt:
        console.print("stopped")


