"""The profile language: what reads aloud parses, and every mistake is named with file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cellbench.bench.faces.cli import app
from cellbench.profiles.library import library_names, library_path
from cellbench.profiles.parse import InputError, load_profile, parse_profile
from cellbench.profiles.schema import ChargeStep, DischargeStep, HoldStep, RepeatStep, RestStep, body_of


def problems(text: str, name: str = "cycle.yaml") -> list[str]:
    with pytest.raises(InputError) as info:
        parse_profile(textwrap.dedent(text), name)
    return info.value.problems


def test_a_profile_that_reads_aloud_parses_into_steps() -> None:
    profile = parse_profile(
        textwrap.dedent(
            """\
            name: formation
            sample_period: 10 s
            steps:
              - rest: 30 min
              - charge: {current: C/20, until: 4.3 V}
              - hold: {voltage: 4.3 V, until: C/50}
              - repeat: 2
                steps:
                  - discharge: {current: 350 uA, until: [2.5 V, 12 h]}
                  - cc: {current: -C/10, until: {voltage: 2.5 V}}
            """
        )
    )
    rest, charge, hold, loop = profile.steps
    assert isinstance(rest, RestStep) and body_of(rest).duration == 1800
    assert isinstance(charge, ChargeStep) and body_of(charge).current.resolve(3.5e-3) == pytest.approx(1.75e-4)
    assert [(lim.kind, lim.value) for lim in body_of(charge).until] == [("voltage", 4.3)]
    assert isinstance(hold, HoldStep) and body_of(hold).until[0].c_rate == pytest.approx(0.02)
    assert isinstance(loop, RepeatStep) and loop.repeat == 2
    discharge = loop.steps[0]
    assert isinstance(discharge, DischargeStep)
    assert [(lim.kind, lim.value) for lim in body_of(discharge).until] == [("voltage", 2.5), ("time", 43200)]
    assert body_of(loop.steps[1]).current.c_rate == pytest.approx(-0.1)
    assert profile.sample_period == 10
    assert profile.executed_step_count() == 3 + 2 * 2


def test_an_unknown_limit_is_named_with_its_line_and_the_known_ones() -> None:
    assert problems(
        """\
        name: x
        steps:
          - rest: 1 h
          - charge: {current: C/20, until: 4.3 V}
          - hold: {voltage: 4.3 V, until: C/50}
          - cc:
              current: 1 mA
              until: {volt: 4.2 V}
        """
    ) == [
        "cycle.yaml:8: steps[3].cc.until: unknown limit 'volt' (expected one of: voltage, current, time, "
        "step_capacity, cycle_capacity, step_energy, cycle_energy, dvdt, didt, temperature, pressure)"
    ]


def test_every_problem_is_reported_not_just_the_first() -> None:
    found = problems(
        """\
        name: x
        steps:
          - rset: 1 h
          - rest: 1
          - charge: {current: 4 parsecs, until: 4.3 V}
          - hold: {voltage: 4.3 V}
          - cv: {voltage: 4.2 V, until: 3 V}
        """
    )
    assert found == [
        "cycle.yaml:3: steps[0]: unknown step 'rset' (expected one of: charge, discharge, cc, hold, cv, cccv, "
        "rest, ramp, drive, pulse, wait, set, eis, schedule, repeat)",
        "cycle.yaml:4: steps[1].rest: 1 has no unit: a duration needs one, e.g. '1 s'",
        "cycle.yaml:5: steps[2].charge.current: '4 parsecs' is not a current (e.g. '2 mA' or 'C/10')",
        "cycle.yaml:6: steps[3].hold: a step needs at least one limit in 'until', or it never ends",
        "cycle.yaml:7: steps[4].cv.until: '3 V' is a voltage limit, which this step cannot end on "
        "(expected one of: current, time, step_capacity, cycle_capacity, step_energy, cycle_energy, dvdt, didt, "
        "temperature, pressure)",
    ]


def test_unknown_top_level_keys_and_missing_steps() -> None:
    assert problems("name: x\nstep:\n  - rest: 1 h\n") == [
        "cycle.yaml:2: unknown profile key 'step' (expected one of: name, description, cell, sample_period, "
        "record, safety, short_detection, time_limit, c_rate_basis, cycle_counting, conditions, steps, format)"
    ]
    assert problems("name: x\n") == ["cycle.yaml:1: 'steps' is required"]


def test_a_repeat_needs_a_positive_count() -> None:
    found = problems("name: x\nsteps:\n  - repeat: 0\n    steps:\n      - rest: 1 h\n")
    assert found == ["cycle.yaml:3: steps[0].repeat: Input should be greater than or equal to 1"]


def test_yaml_syntax_errors_point_at_the_line() -> None:
    assert problems("name: x\nsteps:\n  - rest: [1 h\n  - rest: 2 h\n")[0].startswith("cycle.yaml:4: YAML syntax:")


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read the profile"):
        load_profile(tmp_path / "nope.yaml")


def test_every_library_profile_is_valid() -> None:
    assert "formation-and-cycling" in library_names()
    for name in library_names():
        profile, text = load_profile(library_path(name))
        assert profile.name and text


def test_cellbench_validate_prints_the_steps_or_the_errors_without_a_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(library_path("formation-and-cycling")), "--no-estimate"])
    assert ok.exit_code == 0, ok.output
    assert "repeat × 3" in ok.output and "valid" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - charge: {current: C/20, until: {volt: 4.2 V}}\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml:3: steps[0].charge.until: unknown limit 'volt'" in result.output.replace("\n", "")
    # the runner keeps an exception out of the output: a clean exit is a SystemExit, nothing else
    assert isinstance(result.exception, SystemExit), result.exception
    unknown = runner.invoke(app, ["validate", "formation-and-cycling", "--cell", "coin", "--no-estimate"])
    presets = "pellet, pellet-protected, pouch, polymer"
    assert unknown.exit_code == 2 and f"unknown cell 'coin' (expected one of: {presets})" in unknown.output


def test_a_sample_period_must_be_finite() -> None:
    """`sample_period: inf s` would validate and then never sample again: refused at its line."""
    assert problems("name: x\nsample_period: inf s\nsteps:\n  - rest: 1 h\n") == [
        "cycle.yaml:2: sample_period: Input should be a finite number"
    ]
    assert problems("name: x\nsteps:\n  - rest: {duration: 1 h, sample_period: inf s}\n") == [
        "cycle.yaml:3: steps[0].rest.sample_period: Input should be a finite number"
    ]


def test_c_rates_are_written_as_a_lab_writes_them() -> None:
    from cellbench.profiles.units import c_rate_text

    written = [c_rate_text(x) for x in (1 / 3, 0.05, 2.0, 0.4, -1 / 20, 1.0)]
    assert written == ["C/3", "C/20", "2C", "0.4C", "-C/20", "1C"]


def test_a_run_compiles_its_profile_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The checks before a run, the engine and the run's record all use the one program kept with the profile
    (it was compiled about ten times per run)."""
    import cellbench
    from cellbench.profiles import program

    compiled: list[str] = []
    real = program._compile

    def counted(profile: Any) -> Any:
        compiled.append(profile.name)
        return real(profile)

    monkeypatch.setattr(program, "_compile", counted)
    text = ("name: twice\nsample_period: 1 min\nsteps:\n  - repeat: 2\n    steps:\n"
            "      - charge: {current: C/10, until: 4.2 V}\n      - discharge: {current: C/10, until: 3.0 V}\n")
    result = cellbench.run(text, runs_dir=tmp_path, temperature=60.0)
    assert result.completed, result.outcome.reason
    assert compiled == ["twice"]
