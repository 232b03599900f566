"""The Maccor box over MacNet: the Battery Data Alliance's pymacnet (a client we did not write) against our
simulator served by `cellbench sim serve maccor`, our driver against our simulator and against pymacnet's own
MaccorSpoofer, and many channels read in three requests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from cellbench.drivers.maccor import MacNetBox
from cellbench.roles import Reading
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.maccor import MaccorServer, MaccorSim
from tests.test_cli import announced


@pytest.fixture
def served_box() -> Iterator[tuple[int, int]]:
    """`cellbench sim serve maccor` as its own process; its (JSON port, binary port)."""
    proc, m = announced("maccor", "--port", "0", "--bin-port", "0", "--soc", "0.5",
                        pattern=r"::(\d+)::SOCKET \(MacNet JSON\), binary port (\d+)")
    ports = int(m.group(1)), int(m.group(2))
    yield ports
    proc.terminate()
    proc.wait(timeout=10)


def pymacnet_config(port: int, bin_port: int, channel: int) -> dict[str, object]:
    return {"server_ip": "127.0.0.1", "json_msg_port": port, "bin_msg_port": bin_port, "msg_buffer_size_bytes": 4096,
            "channel": channel, "test_name": "", "test_procedure": "Formation", "c_rate_ah": 0.0035,
            "v_max_safety_limit_v": 4.4, "v_min_safety_limit_v": 2.3, "i_max_safety_limit_a": 0.01,
            "i_min_safety_limit_a": -0.01, "power_safety_limit_chg_w": 0.05, "power_safety_limit_dsg_w": 0.05,
            "v_max_v": 4.2, "v_min_v": 2.5, "data_record_time_s": 1, "data_record_voltage_delta_vbys": 0,
            "data_record_current_delta_abys": 0}


def test_pymacnet_drives_the_served_box(served_box: tuple[int, int]) -> None:
    import pymacnet

    port, bin_port = served_box
    ch3 = pymacnet.ChannelInterface(pymacnet_config(port, bin_port, 3))  # pymacnet counts channels from 1
    assert ch3.get_num_channels() == 8
    status = ch3.read_channel_status()
    assert status["Chan"] == 3 and status["Stat"] == 0 and 3.7 < status["Voltage"] < 3.9  # available, at rest
    assert ch3.start_test_with_direct_control()
    # pymacnet sends (6, 8) right after (6, 7): the help asks 100 ms between direct-mode commands, and a box
    # whose pseudo test procedure is not ready refuses it; our simulator does as the box does
    assert not ch3.set_direct_mode_output(current_a=1e-3, voltage_v=4.2)
    time.sleep(0.3)
    assert ch3.set_direct_mode_output(current_a=1e-3, voltage_v=4.2)  # charge 1 mA, CCCV at 4.2 V
    time.sleep(0.3)
    charging = ch3.read_channel_status()
    assert charging["Stat"] == 2 and charging["RF1"] == 1 and charging["Current"] == pytest.approx(1e-3)
    assert charging["Voltage"] > status["Voltage"] and charging["TestTime"] > 0
    assert ch3.set_direct_mode_output(current_a=-2e-3)  # discharge 2 mA, floor at v_min_v
    time.sleep(0.2)
    discharging = ch3.read_channel_status()
    assert discharging["RF1"] == 2 and discharging["Current"] == pytest.approx(2e-3)
    # (pymacnet sends rest as a binary message addressed to its channel + 1, where the MacNet help says the
    # binary Chan is 0-based like JSON's: on a box that follows the help it reaches another channel. Our driver
    # rests a channel by the binary port itself: test_our_driver_on_the_simulated_box...)
    assert ch3.set_channel_variable(var_num=3, var_value=1.5)
    assert ch3.read_aux() == [pytest.approx(25.0, abs=1.0)]  # the cell's temperature
    statuses = ch3.read_all_channel_statuses()
    assert len(statuses) == 8 and statuses[2]["Stat"] == 2 and statuses[0]["Stat"] == 0  # 0-based on the wire
    assert ch3.reset_channel()
    assert ch3.read_channel_status()["Stat"] == 0
    ch5 = pymacnet.ChannelInterface(pymacnet_config(port, bin_port, 5))
    assert ch5.start_test_with_procedure()  # an on-board procedure: accepted (the simulator rests)
    assert ch5.read_channel_status()["Stat"] == 2


async def test_our_driver_on_the_simulated_box_and_many_channels_in_three_requests() -> None:
    loop = asyncio.get_running_loop()
    sim = MaccorSim([SolidStateCell(soc=0.5) for _ in range(16)], loop.time)
    requests = []
    answer = sim.answer

    def counted(request: object, session: dict[str, bool] | None = None) -> dict[str, object]:
        requests.append(request)
        return answer(request, session)

    sim.answer = counted  # type: ignore[method-assign]
    async with MaccorServer(sim) as server:
        box = await MacNetBox.open(server.resource, name="box1", bin_port=server.bin_port)
        try:
            assert box.channels == 16 and "16 channels" in await box.identify()
            ch = box.channel(4)
            await ch.setup(v_max=4.3, v_min=2.5, i_max=0.01)
            await ch.source_current(-1e-3, voltage_limit=4.3)
            await asyncio.sleep(0.2)
            reading = await ch.measure()
            assert reading.current == pytest.approx(-1e-3) and 3.7 < reading.voltage < 3.85
            assert await ch.output_is_on()
            await ch.source_voltage(4.1, current_limit=2e-3)  # CV well above the cell: charges, limited at 2 mA
            await asyncio.sleep(0.2)
            assert (await ch.measure()).current == pytest.approx(2e-3)
            await ch.output(False)  # rest by the binary port
            assert not await ch.output_is_on() and (await ch.measure()).current == 0
            del requests[:]
            readings = await box.read_many()
            assert len(readings) == 16 and len(requests) == 3  # status, voltages, currents: not 16 requests
            assert readings[4].stat == 2 and all(r.stat == 0 for k, r in enumerate(readings) if k != 4)
        finally:
            await box.close()


def test_our_driver_against_pymacnets_own_spoofer() -> None:
    """pymacnet's MaccorSpoofer, a published MacNet simulator, answers our driver's requests."""
    from pymacnet.maccorspoofer import MaccorSpoofer

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    MaccorSpoofer({"server_ip": "127.0.0.1", "json_port": ports[0], "tcp_port": ports[1], "num_channels": 8}).start()

    async def talk() -> tuple[int, Reading]:
        for _ in range(50):  # the spoofer starts its server threads in the background
            try:
                box = await MacNetBox.open(f"TCPIP::127.0.0.1::{ports[0]}::SOCKET", name="spoof",
                                           bin_port=ports[1], timeout=3)
                break
            except Exception:
                await asyncio.sleep(0.1)
        try:
            return box.channels, await box.channel(0).status()
        finally:
            await box.close()

    channels, reading = asyncio.run(talk())
    assert channels == 8  # the spoofer's general information: the channels it was given
    assert reading == Reading(3.85, 0.0)  # its canned channel status


def test_three_channels_of_one_box_run_a_profile_on_the_bench(tmp_path: object) -> None:
    """A bench file naming three channels of one Maccor box (cycler_channel), run by the engine through MacNet
    on the virtual clock: each channel drives its own cell and records its own run."""
    from pathlib import Path

    from cellbench.bench.runner.config import BenchConfig
    from cellbench.bench.runner.run import run_bench
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.parse import parse_profile

    text = "name: one hour\nsample_period: 1 min\nsteps:\n  - charge: {current: C/20, until: [1 h, 4.2 V]}\n" \
           "  - discharge: {current: C/20, until: [30 min, 2.5 V]}\n"
    runs = Path(str(tmp_path))
    clock = VirtualClock()
    asked: list[tuple[int, int]] = []

    async def main() -> list[object]:
        cells = [SolidStateCell(soc=0.3) for _ in range(8)]
        sim = MaccorSim(cells, asyncio.get_running_loop().time)
        answer = sim.answer

        def counted(request: dict[str, dict[str, int]], session: dict[str, bool] | None = None) -> dict[str, object]:
            asked.append((request["params"]["FClass"], request["params"]["FNum"]))
            return answer(request, session)

        sim.answer = counted  # type: ignore[method-assign]
        async with MaccorServer(sim) as server:
            bench = BenchConfig.model_validate({
                "name": "pilot", "instruments": {"box1": {"driver": "maccor", "resource": server.resource,
                                                          "binary_port": server.bin_port}},
                "cells": {f"P-{k}": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}
                          for k in range(3)},
                "channels": {f"ch{k}": {"cycler": "box1", "cycler_channel": k + 2, "cell": f"P-{k}"} for k in range(3)},
            })
            results = await run_bench(bench, parse_profile(text), text, clock, runs_dir=runs, handle_signals=False)
            # in: C/20 for 1 h, of which the first charge's formation loss (8 %) builds interphases; out: 0.5 h
            stored = 0.05 * (1 - cells[0].params.formation_loss_fraction) - 0.025
            assert [c.state.soc for c in cells[2:5]] == pytest.approx([0.3 + stored] * 3, abs=1e-3)
            assert all(c.state.soc == pytest.approx(0.3) for c in cells[:2] + cells[5:])  # the others untouched
            return list(results)

    results = clock.run(main())
    assert [r.outcome.completed for r in results] == [True] * 3  # type: ignore[attr-defined]
    # the three channels are sampled together: one read of the box per sampling moment, not one per channel
    assert asked.count((4, 7)) == 3  # one full status per channel, when its direct mode starts
    assert asked.count((4, 2)) == asked.count((4, 3)) == asked.count((4, 1))
    with open_run(results[0].database) as store:  # type: ignore[attr-defined]
        moments = len({round(s.test_time, 3) for s in store.samples()})
    assert moments <= asked.count((4, 2)) < 1.5 * moments
    for r in results:
        with open_run(r.database) as store:  # type: ignore[attr-defined]
            samples = store.samples()
        assert max(s.charge_ah for s in samples) == pytest.approx(0.175e-3, rel=0.02)
        assert max(s.discharge_ah for s in samples) == pytest.approx(0.0875e-3, rel=0.02)


def test_the_pilot_line_example_rehearses_seventeen_channels(tmp_path: object) -> None:
    """The bench example with two 8-channel Maccor boxes and a 2450 reference channel, as a dry run through
    the CLI: every channel its own run, each named by its cell. The reference channel owns the oven and the
    press and runs its own profile (warm pressing); box2's channels sit in that oven and read what it does,
    and P-09 sits in the press beside the reference cell."""
    import sqlite3
    from pathlib import Path

    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app

    runs = Path(str(tmp_path)) / "runs"
    profile = Path(str(tmp_path)) / "short.yaml"
    profile.write_text("name: short\nsample_period: 5 min\nsteps:\n  - rest: 6 h\n"
                       "  - charge: {current: C/20, until: [2 h, 4.2 V]}\n  - rest: 30 min\n")
    example = Path(__file__).resolve().parent.parent / "cellbench/bench/examples/pilot-line.yaml"
    result = CliRunner().invoke(app, ["run", str(profile), "--dry-run", "--bench", str(example), "--runs-dir",
                                      str(runs), "--soc", "0.2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    dbs = {p.stem.split("Z-", 1)[1]: p for p in runs.glob("*.sqlite")}
    assert sorted(dbs) == [f"P-{k:02d}" for k in range(1, 17)] + ["REF-01"]
    assert result.output.count(": completed after 8.50 h") == 16 and "ref: completed" in result.output
    # each run records its own slice of the bench (its channel, cell and instruments), not all seventeen
    import json

    (recorded,) = sqlite3.connect(dbs["P-01"]).execute("SELECT value FROM meta WHERE key = 'bench'").fetchone()
    own = json.loads(recorded)
    assert list(own["channels"]) == ["ch01"] and list(own["instruments"]) == ["box1"]

    def hottest(cell: str) -> tuple[float | None, float | None]:
        con = sqlite3.connect(dbs[cell])
        row: tuple[float | None, float | None] = con.execute(
            'SELECT max("Ambient Temperature / degC"), max("Applied Pressure / Pa") FROM samples '
            'WHERE "Test Time / s" <= 6 * 3600').fetchone()
        return row

    # within the first six hours the reference's profile has the oven at 60 degC and the press at 10 MPa
    ref, beside, inside, outside = hottest("REF-01"), hottest("P-09"), hottest("P-12"), hottest("P-01")
    assert ref[0] == pytest.approx(60, abs=1) and inside[0] == pytest.approx(60, abs=1)
    assert outside == (None, None)  # box1's cells are in neither
    # the press holds two cells: 10 MPa is the force over both areas, and each cell feels 10 MPa
    assert ref[1] == pytest.approx(10e6, rel=0.02) and beside[1] == pytest.approx(10e6, rel=0.02)
    assert inside[1] is None


def test_each_channel_runs_the_profile_its_bench_file_names(tmp_path: object) -> None:
    from pathlib import Path

    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app
    from cellbench.bench.runtime.store import open_run

    here = Path(str(tmp_path))
    (here / "charge.yaml").write_text("name: charge only\nsample_period: 5 min\nsteps:\n"
                                      "  - charge: {current: C/20, until: 1 h}\n")
    (here / "discharge.yaml").write_text("name: discharge only\nsample_period: 5 min\nsteps:\n"
                                         "  - discharge: {current: C/20, until: 30 min}\n")
    (here / "rest.yaml").write_text("name: rest\nsample_period: 5 min\nsteps:\n  - rest: 15 min\n")
    bench = here / "bench.yaml"
    bench.write_text(
        "name: mixed\ninstruments:\n  box1: {driver: maccor, resource: \"TCPIP::10.0.0.21::57570::SOCKET\"}\n"
        "cells:\n" + "".join(f"  C{k}: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}\n"
                             for k in range(3)) +
        "channels:\n  a: {cycler: box1, cycler_channel: 0, cell: C0, profile: charge.yaml}\n"
        "  b: {cycler: box1, cycler_channel: 1, cell: C1, profile: discharge.yaml}\n"
        "  c: {cycler: box1, cycler_channel: 2, cell: C2}\n")
    runner = CliRunner()
    refused = runner.invoke(app, ["run", "--dry-run", "--bench", str(bench), "--runs-dir", str(here / "runs")],
                            env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "channel(s) c name no profile in the bench file" in refused.output
    result = runner.invoke(app, ["run", str(here / "rest.yaml"), "--dry-run", "--bench", str(bench), "--runs-dir",
                                 str(here / "runs"), "--soc", "0.5"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    found = {}
    for db in (here / "runs").glob("*.sqlite"):
        with open_run(db) as store:
            meta, samples = store.metadata(), store.samples()
        found[meta["cell_id"]] = (meta["profile_name"], samples[-1].test_time, max(s.charge_ah for s in samples),
                                  max(s.discharge_ah for s in samples))
    assert found["C0"][:2] == ("charge only", 3600.0) and found["C0"][2] == pytest.approx(0.175e-3, rel=0.01)
    assert found["C1"][:2] == ("discharge only", 1800.0) and found["C1"][3] == pytest.approx(0.0875e-3, rel=0.01)
    assert found["C2"][:2] == ("rest", 900.0) and found["C2"][2] == found["C2"][3] == 0


def test_a_box_dropping_off_the_network_fails_its_channels_and_the_other_box_finishes(tmp_path: object) -> None:
    """Two boxes, two channels each; one box goes away mid-run for good. Its channels reconnect for their
    grace time, then fail in the safe state with the cause; the other box's channels finish their profile."""
    from pathlib import Path

    from cellbench.bench.runner.config import BenchConfig
    from cellbench.bench.runner.run import run_bench
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.bench.runtime.runstate import RunStatus
    from cellbench.profiles.parse import parse_profile

    text = "name: two hours\nsample_period: 1 min\nsteps:\n  - charge: {current: C/20, until: [2 h, 4.2 V]}\n"
    clock = VirtualClock()

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        servers = [await MaccorServer(MaccorSim([SolidStateCell(soc=0.3) for _ in range(2)], loop.time)).start()
                   for _ in range(2)]
        bench = BenchConfig.model_validate({
            "name": "two-boxes",
            "instruments": {f"box{b}": {"driver": "maccor", "resource": s.resource, "binary_port": s.bin_port,
                                        "reconnect_grace": "30 s", "timeout": "2 s"}
                            for b, s in enumerate(servers)},
            "cells": {f"c{b}{k}": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}
                      for b in range(2) for k in range(2)},
            "channels": {f"b{b}k{k}": {"cycler": f"box{b}", "cycler_channel": k, "cell": f"c{b}{k}"}
                         for b in range(2) for k in range(2)},
        })

        async def pull_the_cable() -> None:
            await asyncio.sleep(1800)
            await servers[1].close()  # box 1 is gone: its port refuses connections from now on

        cable = asyncio.ensure_future(pull_the_cable())
        try:
            return list(await run_bench(bench, parse_profile(text), text, clock, runs_dir=Path(str(tmp_path)),
                                        handle_signals=False))
        finally:
            await cable
            await servers[0].close()

    results = {r.channel: r.outcome for r in clock.run(main())}  # type: ignore[attr-defined]
    assert results["b0k0"].completed and results["b0k1"].completed
    assert results["b0k0"].test_time == pytest.approx(7200.0)
    for name in ("b1k0", "b1k1"):
        outcome = results[name]
        assert outcome.status is RunStatus.FAULT, outcome
        assert 1800 <= outcome.test_time <= 1800 + 60 + 30 + 5  # the next sample, then the 30 s grace
        assert outcome.reason.startswith(f"instrument fault: box1/{name[-1]}: not recovered within 30 s")


def test_a_channel_left_sourcing_by_a_dead_controller_is_rested_on_connect(tmp_path: object) -> None:
    """A box whose channel 5 still charges (a controller died without its guardian): a run that connects to
    the box turns it off before anything else and records a notice."""
    from pathlib import Path

    from cellbench.bench.runner.config import BenchConfig
    from cellbench.bench.runner.run import run_bench
    from cellbench.bench.runtime.clock import VirtualClock
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.parse import parse_profile

    text = "name: rest\nsample_period: 1 min\nsteps:\n  - rest: 10 min\n"
    clock = VirtualClock()

    async def main() -> tuple[object, float]:
        sim = MaccorSim([SolidStateCell(soc=0.3) for _ in range(8)], asyncio.get_running_loop().time)
        sim.answer({"jsonrpc": "2.0", "method": "MacNet", "id": 1,  # (6, 7): direct mode, charging 1 mA
                    "params": {"FClass": 6, "FNum": 7, "Chan": 5, "TestName": "orphan", "Current": 1e-3,
                               "Voltage": 4.2, "ChMode": "C"}})
        await asyncio.sleep(60)
        assert sim.channels[5].reading[0] == pytest.approx(1e-3)  # sourcing before the run connects
        async with MaccorServer(sim) as server:
            bench = BenchConfig.model_validate({
                "name": "b", "instruments": {"box1": {"driver": "maccor", "resource": server.resource,
                                                      "binary_port": server.bin_port}},
                "cells": {"c": {"capacity": "3.5 mAh", "voltage_min": "2.5 V", "voltage_max": "4.3 V"}},
                "channels": {"ch": {"cycler": "box1", "cycler_channel": 0, "cell": "c"}}})
            (result,) = await run_bench(bench, parse_profile(text), text, clock, runs_dir=Path(str(tmp_path)),
                                        handle_signals=False)
            return result, sim.channels[5].reading[0]

    result, orphan_current = clock.run(main())
    assert orphan_current == 0  # rested by the connect-time check
    with open_run(result.database) as store:  # type: ignore[attr-defined]
        notices = [e["message"] for e in store.events() if e["kind"] == "notice"]
    assert notices == ["box1's output was on when connected; it was turned off"]


def test_sixteen_channels_on_two_boxes_and_a_2450_run_different_library_profiles_at_once(tmp_path: object) -> None:
    """A mixed bench: two simulated Maccor boxes and a 2450, sixteen channels, three library profiles at once.
    Every channel runs its own profile to its end, and a channel's numbers do not depend on its neighbours:
    the same profile on the same kind of cell gives the same per-cycle table on either box."""
    from pathlib import Path

    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app
    from cellbench.bench.results.analysis import cycle_table
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.library import library_path
    from cellbench.profiles.parse import parse_profile

    here = Path(str(tmp_path))
    plan = ["critical-current-density", "hppc", "formation", "critical-current-density"]
    layout = [*[(f"box{b}", k) for b in (1, 2) for k in range(8)][:15], ("smu1", None)]
    channels = {f"ch{n:02d}": (box, k, plan[n % 4] if k is not None else "hppc") for n, (box, k) in enumerate(layout)}
    bench = here / "bench.yaml"
    bench.write_text(
        "name: mixed\ninstruments:\n"
        "  box1: {driver: maccor, resource: \"TCPIP::10.0.0.21::57570::SOCKET\"}\n"
        "  box2: {driver: maccor, resource: \"TCPIP::10.0.0.22::57570::SOCKET\"}\n"
        "  smu1: {driver: keithley2450, resource: \"TCPIP::10.0.0.30::5025::SOCKET\"}\n"
        "cells:\n" + "".join(f"  C{n:02d}: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}\n"
                             for n in range(16)) +
        "channels:\n" + "".join(
            f"  {name}: {{cycler: {box}, {'' if k is None else f'cycler_channel: {k}, '}cell: C{name[2:]}, "
            f"profile: {profile}}}\n" for name, (box, k, profile) in channels.items()))
    result = CliRunner().invoke(app, ["run", "--dry-run", "--bench", str(bench), "--runs-dir", str(here / "runs")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output[-3000:]
    tables: dict[str, list[float]] = {}
    for db in (here / "runs").glob("*.sqlite"):
        with open_run(db) as store:
            meta, samples, steps = store.metadata(), store.samples(), store.steps()
        name = meta["channel"]
        expected = parse_profile(library_path(channels[name][2]).read_text())
        assert meta["profile_name"] == expected.name
        assert steps and steps[-1]["end_reason"] and samples[-1].step_count == len(steps)
        tables[name] = [q for c in cycle_table(samples) for q in (c.charge_ah, c.discharge_ah)]
    assert len(tables) == 16
    # the same profile on box1 and on box2 (channels n and n + 8 share a profile): the same numbers
    for n in range(7):
        a, b = f"ch{n:02d}", f"ch{n + 8:02d}"
        assert channels[a][2] == channels[b][2]
        assert tables[a] == pytest.approx(tables[b], rel=1e-6), (a, b)
    assert all(max(t) > 0 for t in tables.values())  # every channel moved charge
