"""Hostile input gets a one-line error, never a traceback or a runaway: the loaders of profiles and bench
files, and every protocol parser of the simulators and drivers, under random mutation (hypothesis)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellbench.bench.runner.config import BenchConfig, load_bench
from cellbench.drivers.methodscript import check_error, decode_value, parse_package
from cellbench.profiles.library import library_path
from cellbench.profiles.parse import InputError, load_profile, parse_profile, validate_yaml
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.espec import EspecChamberSim
from cellbench.simulators.keithley2450 import Keithley2450Sim

PROFILES = [library_path(n).read_text() for n in ("formation-and-cycling", "hppc", "pressure-sweep")]
BENCH = (Path(__file__).resolve().parent.parent / "cellbench/bench/examples/pressure-rig.yaml").read_text()
# what breaks parsers: YAML's own punctuation, aliases, arithmetic pint would evaluate, control characters
NASTY = ["\x00", "\x1b", "&a ", "*a", "<<: *a", "[", "]", "{", "}", ":", "- ", "\n", "  ", "'", '"', "#", "!!python",
         "C/0", "1/0", "(", "9**9**9", "1e999", "-", "inf", "nan", "\t", "%", "@", "|", ">", "\ufeff", "é"]


@st.composite
def mutated(draw: st.DrawFn, texts: list[str]) -> str:
    text = draw(st.sampled_from(texts))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        match draw(st.sampled_from(["insert", "delete", "replace"])):
            case "insert":
                text = text[:at] + draw(st.sampled_from(NASTY) | st.text(max_size=4)) + text[at:]
            case "delete":
                text = text[:at] + text[at + draw(st.integers(1, 20)):]
            case _:
                text = text[:at] + draw(st.sampled_from(NASTY)) + text[at + 1:]
    return text


def one_line_problems(exc: InputError, source: str) -> None:
    assert exc.problems, "an InputError names at least one problem"
    for line in exc.problems:
        assert "\n" not in line and line.startswith(source), line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(PROFILES))
def test_a_mutated_profile_validates_or_says_why_in_one_line(text: str) -> None:
    try:
        parse_profile(text, "fuzz.yaml")
    except InputError as exc:
        one_line_problems(exc, "fuzz.yaml")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated([BENCH]))
def test_a_mutated_bench_file_validates_or_says_why_in_one_line(text: str) -> None:
    try:
        validate_yaml(text, "bench.yaml", BenchConfig, BenchConfig.reference_problems)
    except InputError as exc:
        one_line_problems(exc, "bench.yaml")


@pytest.mark.parametrize(("text", "says"), [
    ("name: a\x00b\nsteps:\n  - rest: 1 min\n", "p.yaml:1: a character YAML does not allow ('\\x00')"),
    ("name: c\nsteps:\n  - charge: {current: C/0, until: 4.2 V}\n", "p.yaml:3: steps[0].charge.current: 'C/0' is not"),
    ("name: r\nsteps:\n  - rest: 1/0 min\n", "p.yaml:3: steps[0].rest: '1/0 min' is not a duration"),
    ("name: r\nsteps:\n  - rest\n", "p.yaml:3: steps[0]: 'rest' never ends"),
    ("name: r\nsteps:\n  - rest: (1 min\n", "p.yaml:3: steps[0].rest: '(1 min' is not a duration"),
    ("name: r\nsteps:\n  - rest: 9**9**9 s\n", "p.yaml:3: steps[0].rest: '9**9**9 s' is not a duration"),
    ("name: s\nsample_period: 1e-9 s\nsteps:\n  - rest: 1 min\n", "p.yaml:2: sample_period: "),
    ("name: d\nsteps: " + "[" * 5000 + "]" * 5000 + "\n", "p.yaml"),
    ("a: &a [*a]\nname: x\nsteps:\n  - rest: 1 min\n", "p.yaml"),
])
def test_the_reproducers_of_the_fuzz_each_get_one_line(text: str, says: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_profile(text, "p.yaml")
    one_line_problems(caught.value, "p.yaml")
    assert caught.value.problems[0].startswith(says), caught.value.problems


def test_a_yaml_alias_bomb_is_refused_without_expanding_it() -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, 9):  # 9**9 strings once expanded: gigabytes
        prev, cur = chr(ord("a") + k - 1), chr(ord("a") + k)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    text = "\n".join(lines) + "\nname: x\nsteps:\n  - rest: 1 min\n"
    assert len(text) < 500
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            parse_profile(text, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "more than 200,000 values once its aliases are expanded" in caught.value.problems[0]
    assert peak < 20e6  # bytes: refused from the composed graph, never built


def test_files_that_are_not_profiles_are_refused_in_one_line(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * 5_000_000 + "\n")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00name")
    drive = tmp_path / "drive.yaml"
    drive.write_text("name: d\nsteps:\n  - drive: {file: /dev/zero, quantity: current, until: 1 h}\n")
    for path, says in [(big, "too large for a profile"), (binary, "not UTF-8 text"), (Path("/dev/zero"),
                       "not a regular file"), (tmp_path / "none.yaml", "no such file"),
                       (drive, "drive.yaml:3: steps[0].drive.file: cannot use drive file: zero: not a regular")]:
        with pytest.raises(InputError) as caught:
            load_profile(path)
        assert len(caught.value.problems) == 1 and says in caught.value.problems[0], caught.value.problems
    with pytest.raises(InputError) as caught:
        load_bench(Path("/dev/zero"))
    assert "cannot read the bench file: not a regular file" in caught.value.problems[0]


PROTOCOL_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=80) | st.sampled_from(
    [":SOUR:CURR 1e999", ":SOUR:CURR nan", ":READ? \"", "TEMP, S9e99", "TEMP,S-inf", "*IDN?;;;", ":OUTP 2",
     "MODE, RUN 1e9", "ZYX", "", ";", "e", "Pda\x00", "Z!0006"])


@settings(max_examples=400, deadline=None)
@given(PROTOCOL_TEXT)
def test_the_simulators_answer_any_line_without_raising(line: str) -> None:
    smu = Keithley2450Sim(SolidStateCell(), lambda: 0.0)
    reply = smu.handle(line)
    assert reply is None or isinstance(reply, str)
    chamber = EspecChamberSim(lambda: 0.0)
    answer = chamber.handle(line)
    assert answer is None or isinstance(answer, str)


@settings(max_examples=400, deadline=None)
@given(PROTOCOL_TEXT)
def test_the_methodscript_decoder_takes_any_line_or_refuses_it_plainly(line: str) -> None:
    check_error(line)
    for parse in (decode_value, parse_package):
        try:
            parse(line)
        except ValueError:
            pass  # a garbled reply is a ValueError (a ProtocolError to the driver), never anything else


def test_the_cli_answers_hostile_files_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cellbench.bench.faces.cli import app

    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join(['*' + chr(97 + k)] * 9)}]" for k in range(8)]
    files = {"nul.yaml": "name: a\x00\nsteps:\n  - rest: 1 min\n", "bomb.yaml": "\n".join(bomb) + "\nname: x\n",
             "pint.yaml": "name: p\nsteps:\n  - rest: 9**9**9 s\n", "deep.yaml": "a: " + "[" * 3000 + "]" * 3000}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        for command in (["validate", "--no-estimate"], ["run", "--dry-run", "--runs-dir", str(tmp_path / "runs")]):
            result = CliRunner().invoke(app, [command[0], str(tmp_path / name), *command[1:]],
                                        env={"COLUMNS": "300"})
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(name), (name, result.output)
    assert not (tmp_path / "runs").exists()
