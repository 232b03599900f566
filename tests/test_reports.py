"""From samples to answers: analysis with known answers, Battery Data Format export judged by the
format's own validator and read by PyProBE, the report, and the comparison of two cells."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellbench.bench.faces.cli import app
from cellbench.bench.results.analysis import cycle_life, cycle_table, dcir, dqdv, run_cycle_table, store_table
from cellbench.bench.results.export import export_run
from cellbench.bench.results.report import write_report
from cellbench.bench.runtime.events import Note, NoteKind, Sample
from cellbench.bench.runtime.store import RunStore, open_run
from tests.conftest import dry_run


def synthetic_cycles(path: Path, fade_per_cycle: float, cycles: int, capacity: float = 3.5e-3) -> Path:
    """A run database whose discharge capacity falls by exactly fade_per_cycle of the first each cycle."""
    with RunStore(path, durable=False) as store:
        store.set_metadata(cell={"volume_cm3": 0.06}, profile_name="synthetic", run_id=path.stem, channel="ch1")
        t = 0.0
        for c in range(1, cycles + 1):
            q = capacity * (1 - fade_per_cycle * (c - 1))
            store.add(Sample(t, t, 4.0, 1e-3, c, 2 * c - 1, 1, "CC Charge", q, 0.0, q * 3.9, 0.0), t)
            t += 1.0
            store.add(Sample(t, t, 3.0, -1e-3, c, 2 * c, 2, "CC Discharge", q, q, q * 3.9, q * 3.7), t)
            t += 1.0
    return path


def test_a_fade_of_0_05_percent_a_cycle_gives_400_cycles_to_80_percent(tmp_path: Path) -> None:
    db = synthetic_cycles(tmp_path / "a.sqlite", 0.0005, 600)
    with RunStore(db) as store:
        rows = cycle_table(store.iter_samples(), volume_cm3=0.06)
    assert cycle_life([r.retention for r in rows if r.retention is not None]) == pytest.approx(400.0)
    first = rows[0]
    assert first.coulombic_efficiency == pytest.approx(1.0)
    assert first.mean_discharge_voltage == pytest.approx(3.7)
    assert first.mean_charge_voltage == pytest.approx(3.9)
    # 3.5 mAh at 3.7 V in 0.06 cm³: 12.95 mWh / 0.06 mL = 215.8 Wh/L
    assert first.energy_density_wh_l == pytest.approx(3.5e-3 * 3.7 / 0.06e-3)
    assert rows[100].retention == pytest.approx(0.95)


def test_specific_and_areal_capacity_from_the_cell_the_run_records(tmp_path: Path) -> None:
    db = synthetic_cycles(tmp_path / "a.sqlite", 0.01, 3)
    with RunStore(db) as store:
        store.set_metadata(cell={"active_mass_g": 0.02, "area": 0.785})  # 20 mg on a 10 mm disc
        rows = run_cycle_table(store.iter_samples(), store.metadata()["cell"])
    # cycle 2 gives back 3.5 mAh × 0.99 = 3.465 mAh: 173.25 mAh/g and 4.414 mAh/cm²
    assert rows[1].specific_capacity_mah_g == pytest.approx(173.25)
    assert rows[1].areal_capacity_mah_cm2 == pytest.approx(3.465 / 0.785)
    assert run_cycle_table([], None) == [] and cycle_table(store_samples(db))[0].specific_capacity_mah_g is None


def store_samples(db: Path) -> list[Sample]:
    with RunStore(db) as store:
        return store.samples()


def test_energy_density_of_the_stack_under_pressure_counts_its_swelling() -> None:
    samples = [
        Sample(0.0, 0.0, 4.0, 1e-3, 1, 1, 1, "CC Charge", 1e-3, 0, 4e-3, 0, displacement_um=0.0),
        Sample(1.0, 1.0, 4.2, 1e-3, 1, 1, 1, "CC Charge", 2e-3, 0, 8e-3, 0, displacement_um=100.0),
        Sample(2.0, 2.0, 3.0, -1e-3, 1, 2, 2, "CC Discharge", 2e-3, 2e-3, 8e-3, 7.4e-3, displacement_um=10.0),
    ]
    (row,) = cycle_table(samples, volume_cm3=1.0, thickness_mm=1.0)
    assert row.energy_density_wh_l == pytest.approx(7.4)  # 7.4 mWh in 1 mL
    assert row.stack_volume_cm3 == pytest.approx(1.1)  # 1 mm grew by 100 µm at most
    assert row.stack_energy_density_wh_l == pytest.approx(7.4 / 1.1)


def test_dcir_at_10_ms_and_2_s_from_a_current_step() -> None:
    def s(t: float, v: float, i: float) -> Sample:
        return Sample(t, t, v, i, 1, 1, 1, "Pulse", 0, 0, 0, 0)

    samples = [s(0.0, 3.800, 0.0), s(10.0, 3.800, 0.0), s(10.01, 3.773, -1e-3), s(12.0, 3.733, -1e-3)]
    (pulse,) = dcir(samples)
    assert pulse.resistance_10ms == pytest.approx(27.0)
    assert pulse.resistance_2s == pytest.approx(67.0)


def test_dqdv_of_a_linear_curve_is_flat() -> None:
    samples = [Sample(t, t, 4.0 - 0.001 * t, -1e-3, 1, 1, 1, "CC Discharge", 0, 1e-5 * t, 0, 0) for t in range(500)]
    curve = dqdv(samples, bin_v=0.01)
    assert curve and all(d == pytest.approx(1e-2, rel=1e-6) for _, d in curve)


def test_dqdv_finds_one_cycles_plateau_without_the_others_or_the_rests() -> None:
    """By hand: Q(V) = 1 mAh/V x (4.2 - V) + 0.2 mAh x (1 - tanh((V - V0) / 0.02)) / 2 has dQ/dV = 1 mAh/V plus
    a peak of 0.2 / (2 x 0.02) = 5 mAh/V at V0. Cycle 1 has its plateau at 3.70 V, cycle 2 at 3.65 V; a rest
    with noisy currents sits between them."""
    import math

    def q(v: float, v0: float) -> float:
        return 1e-3 * (4.2 - v) + 0.2e-3 * (1 - math.tanh((v - v0) / 0.02)) / 2

    samples = []
    for cycle, v0 in ((1, 3.70), (2, 3.65)):
        for k in range(1200):
            v = 4.2 - 0.001 * k
            samples.append(Sample(k, k, v, -1e-3, cycle, cycle, 1, "CC Discharge", 0, q(v, v0) - q(4.2, v0), 0, 0))
        samples += [Sample(2000 + k, 0, 3.0 + 1e-4 * k, (-1) ** k * 2e-9, cycle, 9, 2, "Rest", 0, 0, 0, 0)
                    for k in range(50)]
    curve = dqdv(samples, cycle=1)
    v_peak, peak = max(curve, key=lambda p: p[1])
    assert v_peak == pytest.approx(3.70, abs=0.005) and peak == pytest.approx(6e-3, rel=0.05)
    away = [d for v, d in curve if abs(v - 3.70) > 0.2]
    assert away and all(d == pytest.approx(1e-3, rel=0.02) for d in away)  # no trace of cycle 2 nor the rests
    assert max(dqdv(samples, cycle=2), key=lambda p: p[1])[0] == pytest.approx(3.65, abs=0.005)


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sim")
    dry_run(
        """
        name: small formation with impedance
        sample_period: 2 min
        steps:
          - charge: {current: C/10, until: 4.3 V}
          - eis: {from: 100 kHz, to: 0.1 Hz, points_per_decade: 5}
          - discharge: {current: C/10, until: 2.5 V}
          - charge: {current: C/10, until: 4.3 V}
          - discharge: {current: C/10, until: 2.5 V}
        """, tmp, soc=0.0, temperature=60.0, environment=True)
    (db,) = tmp.glob("runs-*/*.sqlite")
    return db


def test_the_export_passes_the_battery_data_formats_own_validator(simulated_run: Path, tmp_path: Path) -> None:
    files = export_run(simulated_run, tmp_path)
    for kind in ("csv", "parquet", "eis"):
        result = subprocess.run(
            [str(Path(sys.executable).parent / "bdf"), "validate", "--strict", str(files[kind])],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "passed" in result.stdout
    meta = json.loads(files["metadata"].read_text())
    assert meta["current_sign"] == "positive on charge"
    assert meta["cell"]["capacity"] == pytest.approx(3.5e-3) and meta["cell"]["volume_cm3"] == pytest.approx(0.06)
    assert "eis:" in meta["profile"]["text"] and meta["cellbench_version"]
    assert "Displacement / um" in meta["non_standard_columns"]
    assert set(meta["instruments"]) == {"smu1", "chamber1", "press1", "pstat1"}
    header = files["csv"].read_text().splitlines()[0].split(",")
    assert header[:4] == ["Test Time / s", "Unix Time / s", "Voltage / V", "Current / A"]
    assert "Applied Pressure / Pa" in header and "Net Capacity / Ah" in header
    eis_lines = files["eis"].read_text().splitlines()
    assert eis_lines[0] == ("Test Time / s,Voltage / V,Current / A,Step Count / 1,Frequency / Hz,"
                            "Real Impedance / ohm,Imaginary Impedance / ohm")
    t, v, i = (float(x) for x in eis_lines[1].split(",")[:3])
    assert t > 0 and 3.5 < v < 4.4 and i == 0.0  # after the charge: the bias is the charged cell's OCV
    # the BDF tooling's layout: each table's sidecar beside it, named after it; it says how capacities add up
    assert files["metadata"].name == files["csv"].name + ".metadata.json"
    assert files["eis-metadata"].name == files["eis"].name + ".metadata.json"
    assert meta["capacity_accumulation"]["Charging Capacity / Ah"].startswith("per cycle")


def test_pyprobe_reads_the_export(simulated_run: Path, tmp_path: Path) -> None:
    import polars as pl
    import pyprobe
    from pyprobe.cyclers.column_maps import CastAndRenameMap

    files = export_run(simulated_run, tmp_path)
    maps = [
        CastAndRenameMap("Time [s]", "Test Time / s", pl.Float64),
        CastAndRenameMap("Current [A]", "Current / A", pl.Float64),
        CastAndRenameMap("Voltage [V]", "Voltage / V", pl.Float64),
        CastAndRenameMap("Step", "Step Count / 1", pl.Int64),
        CastAndRenameMap("Capacity [Ah]", "Net Capacity / Ah", pl.Float64),
    ]
    cell = pyprobe.Cell(info={"Name": "pellet"})
    # PyProBE's generic importer reads CSV (its parquet reader wants PyProBE's own columns)
    cell.import_from_cycler("formation", cycler="generic", input_data_path=str(files["csv"]),
                            output_data_path=str(tmp_path / "pyprobe.parquet"), column_importers=maps)
    discharge = cell.procedure["formation"].discharge(-1)
    capacity = discharge.data["Capacity [Ah]"]
    # by hand: a C/10 charge with no CV stops short, and a C/10 discharge ends early, each by diffusion's lead of
    # 0.1 / 3600 s x R^2 / (15 D) = 1.26 % of the capacity
    lead = 0.1 / 3600 * (5.22e-4) ** 2 / 4e-11 / 15
    assert capacity.max() - capacity.min() == pytest.approx(3.5e-3 * (1 - 2 * lead), rel=0.01)
    # every discharge as PyProBE reads it from the export equals ours, within 0.05 %
    with open_run(simulated_run) as store:
        ours = [row.discharge_ah for row in cycle_table(store.samples()) if row.discharge_ah > 0]
    theirs = []
    for k in range(len(ours)):
        q = cell.procedure["formation"].discharge(k).data["Capacity [Ah]"]
        theirs.append(q.max() - q.min())
    assert len(ours) == 2 and theirs == pytest.approx(ours, rel=5e-4)


def test_cellpy_reads_the_export_with_the_instrument_file_beside_it(simulated_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """cellpy (not ours) reads the CSV through the cellpy.yml the export writes, and gets our capacities."""
    monkeypatch.chdir(tmp_path)  # cellpy writes its logs into the working directory
    import cellpy

    files = export_run(simulated_run, tmp_path)
    sidecar = json.loads(files["metadata"].read_text())
    assert sidecar["readers"]["cellpy"] == (f"cellpy.get('{files['csv'].name}', instrument='custom', "
                                            f"instrument_file='{files['cellpy'].name}', cycle_mode='full_cell')")
    cell = cellpy.get(str(files["csv"]), instrument="custom", instrument_file=str(files["cellpy"]), mass=1.0,
                      cycle_mode="full_cell")
    summary = cell.data.summary
    with open_run(simulated_run) as store:
        ours = cycle_table(store.samples())
    assert list(summary.index) == [r.cycle for r in ours]
    assert list(summary["charge_capacity"]) == pytest.approx([r.charge_ah for r in ours], rel=1e-6)
    assert list(summary["discharge_capacity"]) == pytest.approx([r.discharge_ah for r in ours], rel=1e-6)
    # the coulombic efficiency as the sidecar's reader line gets it: discharge over charge, ours by hand
    efficiency = list(summary["coulombic_efficiency"])
    by_hand = [100 * r.discharge_ah / r.charge_ah if r.charge_ah else None for r in ours]
    assert all(e == pytest.approx(h, rel=1e-6) for e, h in zip(efficiency, by_hand, strict=True) if h), (
        efficiency, by_hand)
    # why the reader line names the mode: cellpy's default reads this cell's efficiency upside down
    upside_down = cellpy.get(str(files["csv"]), instrument="custom", instrument_file=str(files["cellpy"]), mass=1.0)
    first = next(iter(upside_down.data.summary["coulombic_efficiency"]))
    assert by_hand[0] is not None and by_hand[0] < 100 < first


def test_the_report_writes_real_pngs_and_a_page_with_the_cycle_table(simulated_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(simulated_run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"time-series.png", "cycles.png", "dqdv.png", "nyquist.png", "voltage-capacity.png",
                    "retention.png", "resistance.png"}
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 600 and height >= 400
    assert int.from_bytes((out / "cycles.png").read_bytes()[16:20], "big") == 800
    page = (out / "index.html").read_text()
    assert page.count("<tr><td>") == 2 and "cycles.png" in page and "nyquist.png" in page
    assert "<strong>Outcome: completed</strong>" in page and "Cycle life to 80 % retention: not reached" in page
    assert all(f'src="{name}"' in page for name in pngs)  # every image the page shows is there


def test_the_report_works_on_a_run_that_is_still_going(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite"
    store = RunStore(db, durable=False)
    for t in range(5):
        store.add(Sample(float(t), float(t), 3.8, 1e-3, 1, 1, 1, "CC Charge", 1e-6 * t, 0, 0, 0), float(t))
    store.flush()
    try:
        page = write_report(db, tmp_path / "live")  # the writer still has it open
        assert "5 samples" in page.read_text()
    finally:
        store.close()


def test_compare_states_the_cycle_life_ratio_of_two_cells(tmp_path: Path) -> None:
    bare = synthetic_cycles(tmp_path / "bare-li.sqlite", 0.001, 300)
    protected = synthetic_cycles(tmp_path / "protected-li.sqlite", 0.001 / 3, 700)
    result = CliRunner().invoke(
        app, ["compare", str(bare), str(protected), "--out", str(tmp_path / "cmp.png")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "bare-li: cycle life to 80 % 200.0 cycles" in result.output
    assert "protected-li: cycle life to 80 % 600.0 cycles" in result.output
    assert "cycle-life ratio protected-li / bare-li: 3.00" in result.output
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_writes_its_plot_beside_the_runs_not_wherever_it_is_run(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    a, b = synthetic_cycles(runs / "a.sqlite", 0.001, 30), synthetic_cycles(runs / "b.sqlite", 0.002, 30)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["compare", str(a), str(b)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (runs / "compare.png").read_bytes()[:4] == b"\x89PNG" and not list(elsewhere.iterdir())


def test_dcir_takes_noisy_currents_as_held_and_ignores_noise_edges_and_zero_ms_pairs() -> None:
    def s(t: float, v: float, i: float) -> Sample:
        return Sample(t, t, v, i, 1, 1, 1, "Pulse", 0, 0, 0, 0)

    noise = 1.9e-9  # A: the reading noise of a held current
    samples = [
        s(0.0, 3.800, 2e-9), s(5.0, 3.800, -1e-9),  # a rest: its noise steps are no edges
        s(10.0, 3.800, 0.0), s(10.0, 3.790, -1e-3),  # a reading at the edge itself: no 10 ms value
        s(20.0, 3.750, -1e-3), s(20.01, 3.7773, 0.0), s(22.0, 3.7853, noise),  # an edge, 2 s later held at 0
    ]
    (edge,) = dcir(samples)
    # by hand: (3.7773 - 3.750) / (0 - -1 mA) = 27.3 ohm at 10 ms, (3.7853 - 3.750) / 1 mA = 35.3 ohm at 2 s
    assert edge.test_time == 20.0 and edge.delta_current == pytest.approx(1e-3)
    assert edge.resistance_10ms == pytest.approx(27.3) and edge.resistance_2s == pytest.approx(35.3)


def test_coulombic_efficiency_is_not_shown_for_noise() -> None:
    from cellbench.bench.results.analysis import CycleSummary

    assert CycleSummary(1, 3.4e-9, 5.9e-9, 0, 0).coulombic_efficiency is None  # both 0.0000 mAh
    assert CycleSummary(1, 3.5e-3, 0.0, 0, 0).coulombic_efficiency is None
    assert CycleSummary(1, 3.5e-3, 3.43e-3, 0, 0).coulombic_efficiency == pytest.approx(0.98)


def test_retention_and_cycle_life_compare_reference_steps_only() -> None:
    """A synthetic run: cycle 1 a slow reference (10 mAh), cycles 2-3 fast (9 mAh then 8.6), cycle 4 a slow
    reference again (7.5 mAh). Against the first reference the fast cycles would read 90 % and 86 %; only the
    references count: cycle 4 is at 75 %, and 80 % fell two thirds of the way from cycle 1 to cycle 4."""
    from cellbench.bench.results.analysis import references

    def s(t: float, cycle: int, step: int, q: float) -> Sample:
        return Sample(t, t, 3.0, -1e-3, cycle, step, step, "CC Discharge", 0, q, 0, 0)

    samples = [s(0, 1, 1, 0.0), s(1, 1, 1, 10e-3), s(2, 2, 2, 9e-3), s(3, 3, 3, 8.6e-3),
               s(4, 4, 4, 0.0), s(5, 4, 4, 7.5e-3)]
    steps = [{"step_count": n, "path": path, "end_reason": "voltage <= 2.5 V"}
             for n, path in ((1, "[0].steps[0]"), (2, "[0].steps[1]"), (3, "[0].steps[1]"), (4, "[0].steps[0]"))]
    profile = ("name: r\nsteps:\n  - repeat: 2\n    steps:\n"
               "      - discharge: {current: C/20, until: 2.5 V, reference: true}\n"
               "      - discharge: {current: C/3, until: 2.5 V}\n")
    refs = references(samples, steps, profile)
    assert refs == {1: pytest.approx(10e-3), 4: pytest.approx(7.5e-3)}
    rows = cycle_table(samples, references=refs)
    assert [r.retention for r in rows] == [pytest.approx(1.0), None, None, pytest.approx(0.75)]
    # by hand: from 100 % at cycle 1 to 75 % at cycle 4, 80 % is reached at 1 + 0.8 x 3 = cycle 3.4: 2.4 after
    assert cycle_life([1.0, 0.75], cycles=[1, 4]) == pytest.approx(2.4)
    assert references(samples, steps, "name: r\nsteps:\n  - rest: 1 h\n") == {}  # no marks: no references


def test_a_run_that_did_not_finish_says_so_first_and_claims_no_cycle_life(tmp_path: Path) -> None:
    db = tmp_path / "stopped.sqlite"
    store = RunStore(db, durable=False)
    for t, (c, q) in enumerate([(1, 3.5e-3), (2, 3.4e-3), (3, 0.6e-3)]):  # the third discharge cut short
        store.add(Sample(float(t), float(t), 3.0, -1e-3, c, c, 1, "CC Discharge", 0, q, 0, 0), float(t))
    store.record(Note(NoteKind.END, "safety stop: hard short: 0.41 V", 3.0, 3.0))
    store.close()
    page = write_report(db, tmp_path / "report").read_text()
    assert page.index("Outcome: safety stop: hard short: 0.41 V") < page.index("<table>")
    assert "No cycle life: the run did not reach the end of its profile" in page  # not "0.2 cycles"


def test_a_protected_anode_lives_longer_by_its_mechanism_and_compare_shows_the_ratio(tmp_path: Path) -> None:
    """The same C/3 profile on the bare and the protected pellet, aged quickly alike: the film acts on the Li|SE
    share of the fade (3/4 of it, cut to a tenth), so by hand the ratio is 1 / (0.25 + 0.75 x 0.1) = 3.08."""
    from cellbench.simulators.parameters import PELLET, PELLET_PROTECTED

    text = """
    name: c3 life
    sample_period: 2 min
    steps:
      - repeat: 60
        steps:
          - cccv: {current: C/3, voltage: 4.3 V, until: [C/20, 5 h]}
          - rest: 10 min
          - discharge: {current: C/3, until: 2.5 V, reference: true, check: {retention: "< 80 %", then: end}}
          - rest: 10 min
    """
    dbs = []
    for name, params in (("bare", PELLET), ("protected", PELLET_PROTECTED)):
        run = dry_run(text, tmp_path / name, soc=0.0, temperature=60.0, noise=False,
                      params=params.model_copy(update={"cycles_to_80pct": 40.0}))
        assert run.outcome.completed and run.steps[-1]["end_reason"].endswith("then retention <= 0.8")
        (db,) = (tmp_path / name).glob("runs-*/*.sqlite")
        dbs.append(db.rename(tmp_path / f"{name}.sqlite"))
    result = CliRunner().invoke(app, ["compare", *map(str, dbs), "--out", str(tmp_path / "cmp.png")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    ratio = float(result.output.split("cycle-life ratio protected / bare:")[1].split()[0])
    assert ratio == pytest.approx(1 / (0.25 + 0.75 * 0.1), rel=0.05)


def test_the_report_page_renders_in_a_real_browser_with_no_broken_image(simulated_run: Path, tmp_path: Path) -> None:
    """Headless Chromium (Debian's chromium and chromium-driver, which .ci/run installs) opens the page: every
    image loads, the outcome heads the page, and a screenshot is taken."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no chromium/chromedriver: sudo apt-get install chromium chromium-driver (Debian), "
                    "or run .ci/run as root")
    page = write_report(simulated_run, tmp_path / "report")
    (tmp_path / "report" / "broken.png").write_bytes(b"not a png")  # the check itself must see a broken image
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        assert len(images) == 7 and all(ok for _, ok in images), images
        driver.execute_script("const i = document.createElement('img'); i.src = 'broken.png'; document.body.append(i);")
        driver.execute_script("return new Promise(r => setTimeout(r, 200))")
        loaded = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth > 0)")
        assert loaded[-1] is False  # a broken image is told apart
        first = driver.find_element(By.CSS_SELECTOR, "p.outcome").text
        assert first == "Outcome: completed"
        shot = tmp_path / "report.png"  # (kept with the test's files, for a look)
        assert driver.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") >= 1000
    finally:
        driver.quit()


def test_the_report_page_shows_hostile_run_metadata_as_text(tmp_path: Path) -> None:
    """A cell ID, comment or profile name is what someone typed: the page shows it, never runs it."""
    db = tmp_path / "hostile.sqlite"
    store = RunStore(db, durable=False)
    store.set_metadata(cell_id="<script>alert('cell')</script>", comment='<img src=x onerror="alert(1)">',
                       profile_name="</title><script>alert('name')</script>", operator="O'Brien & Co")
    for t in range(3):
        store.add(Sample(float(t), float(t), 3.8, 1e-3, 1, 1, 1, "CC Charge", 1e-6 * t, 0, 0, 0), float(t))
    store.close()
    page = write_report(db, tmp_path / "out").read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;cell&#39;)&lt;/script&gt;" in page and "O&#39;Brien &amp; Co" in page


def test_unix_time_going_backwards_is_said_by_the_export_and_the_report(tmp_path: Path) -> None:
    """A run whose wall-clock stamps step back (as every channel's did after a pause before the clock kept one
    origin): the sidecar, the export command and the report page say where and by how much; a clean run says
    nothing."""
    db = tmp_path / "stepped.sqlite"
    with RunStore(db, durable=False) as store:
        store.set_metadata(profile_name="stepped", run_id="stepped", channel="ch1")
        for t, unix in enumerate([100.0, 101.0, 102.0, 99.5, 100.5, 103.0, 102.0]):
            store.add(Sample(float(t), unix, 3.9, 1e-3, 1, 1, 1, "CC Charge", 0, 0, 0, 0), float(t))
    said = "Unix time goes backwards 2 time(s) in this run, by up to 2.500 s (first at data point 4)"
    files = export_run(db, tmp_path / "out")
    assert json.loads(files["metadata"].read_text())["unix_time_problem"].startswith(said)
    result = CliRunner().invoke(app, ["export", str(db), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0 and said in " ".join(result.output.split())
    assert said in write_report(db, tmp_path / "report").read_text()
    clean = synthetic_cycles(tmp_path / "clean.sqlite", 0.01, 3)
    assert json.loads(export_run(clean, tmp_path / "clean")["metadata"].read_text())["unix_time_problem"] is None
    assert "backwards" not in write_report(clean, tmp_path / "clean-report").read_text()


def test_coulombic_efficiency_only_for_cycles_with_a_whole_charge_and_discharge(tmp_path: Path) -> None:
    """A cycle of pulses (each ended by time) once read a CE of 16,278 %: blank now. A whole cycle's CE is its
    discharge over its charge, integrated here by hand from its samples (trapezoids of the current)."""
    run = dry_run("""
        name: whole and pulsed
        sample_period: 30 s
        steps:
          - cccv: {current: C/5, voltage: 4.2 V, until: C/20}
          - discharge: {current: C/5, until: 3.7 V}
          - charge: {current: C/5, until: 10 s, new_cycle: true}
          - discharge: {current: C/2, until: 30 s}
        """, tmp_path, soc=0.3, temperature=60.0)  # at 60 degC C/5 stays below the lithium's CCD
    assert run.outcome.completed
    assert run.database is not None
    with open_run(run.database) as store:
        rows = {r.cycle: r for r in store_table(store)}
    assert set(rows) == {1, 2}
    assert rows[2].coulombic_efficiency is None and rows[2].charge_ah > 0 and rows[2].discharge_ah > 0
    one = [s for s in run.samples if s.cycle == 1]
    charge = sum((a.current + b.current) / 2 * (b.test_time - a.test_time) / 3600
                 for a, b in itertools.pairwise(one) if a.current > 0 and b.current > 0)
    discharge = -sum((a.current + b.current) / 2 * (b.test_time - a.test_time) / 3600
                     for a, b in itertools.pairwise(one) if a.current < 0 and b.current < 0)
    assert rows[1].coulombic_efficiency == pytest.approx(discharge / charge, rel=0.01)
