"""Watching the machine's runs and channels: runs, status (here or over MQTT)."""


from __future__ import annotations

import calendar
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

# Everything else is imported where it is used: `cellbench --help` and a mistyped option stay fast.
if TYPE_CHECKING:
    from rich.table import Table

    from cellbench.bench.ops import runs
    from cellbench.bench.runtime.clock import Clock
    from cellbench.drivers.registry import DriverSpec

from cellbench.bench.faces.cli.common import _fail, _Output, app, console


def _simulated(instrument: str) -> DriverSpec:
    """A registered driver with a simulator, by its name or (where only one fits) its role or a short name."""
    from cellbench.drivers.registry import drivers

    with_sim = {n: d for n, d in drivers().items() if d.simulator}
    key = instrument.lower()
    if key in with_sim:
        return with_sim[key]
    # a short name first (press, load-cell, espec), then a role (cycler, chamber, potentiostat)
    for fits in ([d for n, d in with_sim.items() if n.endswith(f"-{key}") or key in n.split("-")],
                 [d for d in with_sim.values() if key in d.roles]):
        if len(fits) == 1:
            return fits[0]
    raise _fail(f"unknown instrument '{instrument}' (expected one of: {', '.join(sorted(with_sim))})")


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        raise _fail(f"--since {text!r}: give a date as YYYY-MM-DD (UTC)") from None


@app.command("runs")
def runs_command(
    state: Annotated[str | None, typer.Option(help="only runs in this state (running, completed, interrupted, "
                                                   "failed, safety stop, recording failed)")] = None,
    cell: Annotated[str | None, typer.Option(help="only runs of this cell ID")] = None,
    since: Annotated[str | None, typer.Option(help="only runs started on or after this UTC date (YYYY-MM-DD)")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array, for scripts")] = False,
    all_: Annotated[bool, typer.Option("--all", help="also the runs whose database is gone")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="forget the runs whose database is gone")] = False,
) -> None:
    """Every run this machine has started, newest first: state, cell, where its database and log are (runs whose
    database was deleted are left out unless --all; --prune forgets them)."""
    from rich.table import Table

    from cellbench.bench.ops import runs
    every = runs.entries()
    gone = [e for e in every if not Path(e.database).exists()]
    if prune:
        for e in gone:
            runs.forget(e)
        console.print(f"forgot {len(gone)} run(s) whose database is gone", highlight=False)
        return
    kept = every if all_ else [e for e in every if Path(e.database).exists()]
    found = runs.select(kept, state=state, cell=cell, since=_since(since))
    if as_json:
        print(json.dumps([e.model_dump() for e in found], indent=1))
        return
    if not found:
        console.print(f"no runs registered in {runs.state_dir() / 'runs'}", highlight=False)
        return
    table = Table(title="runs")
    for col in ("run ID", "state", "cell", "channel", "profile", "started (UTC)", "reason", "database"):
        table.add_column(col, overflow="fold")
    for e in found:
        table.add_row(e.run_id, e.state, e.cell_id, e.channel, e.profile, runs.utc(e.started),
                      e.reason if e.state != "completed" else "", e.database)
    _print_wide(table)


OFF_TERMINAL_WIDTH = 400  # columns a table gets when it goes to a file, a pipe or a log: not squeezed into 80


def _print_wide(table: Any) -> None:
    """A table on a terminal at its width; elsewhere (grep, a file, a log) as wide as its rows need."""
    if console.is_terminal:
        console.print(table)
    else:  # a console of its own: rich caps any print at its console's width (80 off a terminal)
        Console(file=_Output("stdout"), width=OFF_TERMINAL_WIDTH).print(table)  # type: ignore[arg-type]


def _hms(seconds: float | None) -> str:
    """1d 02:03:04, or 02:03:04."""
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def _status_table(lives: list[runs.Live]) -> Table:
    from rich.table import Table

    from cellbench.bench.ops import runs
    table = Table(title=f"channels on this machine at {runs.utc(time.time())}")
    left = ("run ID", "cell", "channel", "state", "why", "step")
    for col in (*left, "cycle", "V", "mA", "T1 cell degC", "chamber degC", "MPa", "reading age", "elapsed",
                "step left"):
        table.add_column(col, justify="left" if col in left else "right", overflow="fold")

    def num(value: float | None, fmt: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value * scale, fmt)

    for lv in lives:
        step = "-" if lv.step_count is None else f"{lv.step_count}/{lv.total_steps or '?'} {lv.step_type}"
        cycle = "-" if lv.cycle is None else str(lv.cycle)
        why = lv.entry.reason if lv.entry.state != runs.RUNNING else ""
        table.add_row(lv.entry.run_id, lv.entry.cell_id, lv.entry.channel, lv.entry.state, escape(why) or "-", step,
                      cycle, num(lv.voltage, ".4f"), num(lv.current, "+.4f", 1e3), num(lv.cell_temperature_c, ".1f"),
                      num(lv.chamber_temperature_c, ".1f"), num(lv.pressure_mpa, ".2f"), _hms(lv.reading_age_s),
                      _hms(lv.test_time), _hms(lv.remaining_s))
    return table


def _channels_now() -> list[runs.Live]:
    """Every live run of this machine, and every idle channel of its running controllers with how and when its
    last run ended."""
    from cellbench.bench.ops import control, runs
    every = runs.entries()
    lives = [runs.live(e) for e in every if e.state in (runs.RUNNING, runs.PAUSED)]
    busy = {(lv.entry.bench, lv.entry.channel) for lv in lives}
    for c in control.controllers():
        for name in c.channels:
            if (c.bench, name) in busy:
                continue
            last = next((e for e in every if e.bench == c.bench and e.channel == name), None)
            if last is None:
                idle = runs.RunEntry(run_id="-", channel=name, cell_id="-", bench=c.bench, profile="-", state="idle",
                                     reason="no run since its controller started", database="", pid=c.pid, host="",
                                     started=0.0)
            else:
                when = f" at {runs.utc(last.ended)}" if last.ended else ""
                idle = last.model_copy(update={"state": "idle", "reason": f"its run ended: "
                                                                          f"{last.reason or last.state}{when}"})
            lives.append(runs.Live(idle))
    return lives


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print once as JSON, for scripts")] = False,
    watch: Annotated[bool | None, typer.Option(help="refresh until Ctrl-C (default: on a terminal)")] = None,
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 2.0,
    broker: Annotated[str | None, typer.Option(help="instead of this machine: every bench on this MQTT broker, "
                                                     "mqtt://[user@]host[:port][/prefix] (mqtts:// for TLS)")]
    = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
) -> None:
    """The live state of every channel on this machine (or on an MQTT broker), from any terminal: running,
    paused or latched and why, idle and how its last run ended; how old each reading is, the cell's (T1) and the
    chamber's temperature, and at most how long the step has left by its time and capacity limits."""
    if broker is not None:
        _broker_status(broker, password_file, as_json, ca_file)
        return
    now = _channels_now
    if as_json:
        print(json.dumps([lv.as_dict() for lv in now()], indent=1, default=str))
        return
    if not (console.is_terminal if watch is None else watch):
        _print_wide(_status_table(now()))
        return
    from rich.live import Live

    from cellbench.bench.runtime.clock import RealClock

    try:
        with Live(_status_table(now()), console=console, auto_refresh=False) as screen:
            RealClock().run(watch_status(RealClock(), interval, lambda: screen.update(_status_table(now()),
                                                                                      refresh=True)))
    except KeyboardInterrupt:
        pass


async def watch_status(clock: Clock, interval: float, refresh: Callable[[], None], times: int | None = None) -> None:
    """Refresh the status every `interval` s of the clock's time (`times` refreshes, or until interrupted)."""
    done = 0
    while times is None or done < times:
        await clock.sleep(interval)
        refresh()
        done += 1


PasswordFileOption = Annotated[Path | None, typer.Option(help="a file whose first line is the broker password")]
CaFileOption = Annotated[Path | None, typer.Option(help="the broker's CA certificate, for mqtts:// (the system's "
                                                         "CAs if absent)")]


def _broker_config(url: str, password_file: Path | None, ca_file: Path | None = None) -> Any:
    from cellbench.bench.ops import mqtt
    try:
        cfg = mqtt.from_url(url, password_file, ca_file)
        cfg.password()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return cfg


def _broker_status(url: str, password_file: Path | None, as_json: bool, ca_file: Path | None = None) -> None:
    import asyncio

    import aiomqtt
    from rich.table import Table

    from cellbench.bench.ops import mqtt
    cfg = _broker_config(url, password_file, ca_file)
    try:
        found = asyncio.run(mqtt.statuses(cfg))
    except aiomqtt.MqttError as exc:
        raise _fail(f"broker {cfg.host}:{cfg.port}: {exc}", code=1) from None
    if as_json:
        print(json.dumps([st.model_dump() for st in found], indent=1))
        return
    table = Table(title=f"{len(found)} channel(s) on {cfg.host}:{cfg.port}")
    for column in ("bench", "channel", "state", "run", "step", "cycle", "since"):
        table.add_column(column)
    for st in found:
        table.add_row(st.bench, st.channel, st.state, st.run_id or "-", st.step or "-",
                      "-" if st.cycle is None else str(st.cycle), st.time or "-")
    _print_wide(table)


