"""MQTT telemetry and commands through a real Mosquitto of the test's own, with a real `cellbench run` process
against a served 2450: standard clients read it, commands are the broker's to allow, outages lose nothing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from cellbench.bench.ops import mqtt
from cellbench.bench.runtime.commands import Command
from tests.broker import Broker
from tests.test_cli import announced, serve
from tests.test_unattended import ask, files, run_env, start_run, wait_until_sourcing
from tests.test_unattended import cli as terminal

PROFILE = """
name: long charge
sample_period: 0.5 s
steps:
  - charge: {current: 0.2 mA, until: [4.2 V, 2 h]}
"""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def smu() -> Iterator[str]:
    proc, resource = serve("keithley2450", "--port", "0", "--soc", "0.3")
    yield resource
    proc.terminate()
    proc.wait(timeout=10)


RECIPE = Path(__file__).resolve().parent.parent / "docs" / "recipes" / "telegraf.conf"


def telegraf_reads(topic: str, payload: str) -> dict[str, Any]:
    """What docs/recipes/telegraf.conf takes from one message a standard client received: the inputs whose topic
    filter matches (paho's matcher, the broker's rule), their topic tags, and every json_v2 path resolved with
    its type (a required path missing or null, or a value of the wrong type, fails)."""
    import re
    import tomllib

    from paho.mqtt.client import topic_matches_sub

    message = json.loads(payload)
    inputs = [i for i in tomllib.loads(RECIPE.read_text())["inputs"]["mqtt_consumer"]
              if any(topic_matches_sub(f, topic) for f in i["topics"])]
    assert len(inputs) == 1, f"{topic}: {len(inputs)} inputs of the recipe read it"
    (given,) = inputs
    read: dict[str, Any] = {}
    for parsing in given["topic_parsing"]:
        assert topic_matches_sub(parsing["topic"], topic)
        read |= {k: v for k, v in zip(parsing["tags"].split("/"), topic.split("/"), strict=True) if k != "_"}
    (json_v2,) = given["json_v2"]
    if "timestamp_path" in json_v2:  # the Go layout asks RFC 3339; Go takes a fraction of a second after it
        assert json_v2["timestamp_format"] == "2006-01-02T15:04:05Z07:00"
        stamp = message[json_v2["timestamp_path"]]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp), stamp
    kinds = {"float": (int, float), "int": (int,), "string": (str,)}
    for entry in [*json_v2.get("tag", []), *json_v2.get("field", [])]:
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", entry["path"]), entry["path"]  # plain GJSON: no wildcards
        value: Any = message
        for key in entry["path"].split("."):
            value = value.get(key) if isinstance(value, dict) else None
        name = entry.get("rename", entry["path"])
        if value is None:
            assert entry.get("optional"), f"{topic}: the recipe's {entry['path']} is not in {payload}"
            continue
        assert isinstance(value, kinds[entry.get("type", "string")]), (entry, value)
        read[name] = value
    return read


def mqtt_section(broker: Broker) -> str:
    """The bench file's `mqtt:` section for the test's broker, as the bench's own user."""
    return (f"mqtt:\n  host: 127.0.0.1\n  port: {broker.port}\n  username: bench\n"
            f"  password_file: {broker.password_file('bench')}\n  telemetry_every: 0.5 s\n")


def bench_file(tmp_path: Path, resource: str, broker: Broker) -> tuple[Path, Path]:
    return files(tmp_path, resource, more=mqtt_section(broker), profile_text=PROFILE)


class Watcher:
    """A client of our own (as Grafana or a LIMS would be): every message under the channel, reconnecting."""

    def __init__(self, broker: Broker, user: str = "viewer", session: str | None = None) -> None:
        """`session`: a persistent session of that client ID, whose QoS 1 messages the broker keeps for it while
        it reconnects (a subscriber that misses nothing, on a persistent broker)."""
        self.broker, self.user, self.session = broker, user, session
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                persist: dict[str, Any] = {"identifier": self.session, "clean_session": False} if self.session else {}
                async with aiomqtt.Client("127.0.0.1", self.broker.port, username=self.user,
                                          password=f"{self.user}-secret", **persist) as client:
                    await client.subscribe("cellbench/night/ch1/#", qos=1)
                    async for m in client.messages:
                        self.messages.append((str(m.topic), json.loads(bytes(m.payload)), bool(m.retain)))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    def of(self, suffix: str) -> list[dict[str, Any]]:
        return [p for t, p, _ in self.messages if t == f"cellbench/night/ch1/{suffix}"]

    async def until(self, what: str, test: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((p for p in reversed(self.of(what)) if test(p)), None)
            if found is not None:
                return dict(found)
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {what} message like that within {timeout} s: {self.of(what)[-3:]}")


def equal(key: str, value: object) -> Callable[[dict[str, Any]], bool]:
    return lambda payload: bool(payload[key] == value)


def at_least(key: str, value: float) -> Callable[[dict[str, Any]], bool]:
    return lambda payload: bool(payload[key] >= value)


async def command(broker: Broker, user: str, name: str, payload: dict[str, Any]) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, username=user, password=f"{user}-secret") as client:
        await client.publish(f"cellbench/night/ch1/cmd/{name}", json.dumps(payload), qos=1)


def sequence(w: Watcher) -> list[int]:
    return sorted({p["seq"] for p in w.of("telemetry") + w.of("event")})


@contextlib.asynccontextmanager
async def running(tmp_path: Path, smu: str, broker: Broker) -> AsyncIterator[subprocess.Popen[str]]:
    bench, profile = bench_file(tmp_path, smu, broker)
    proc = start_run(tmp_path, bench, profile)
    try:
        await asyncio.to_thread(wait_until_sourcing, smu)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out = await asyncio.to_thread(proc.communicate, timeout=30)
        print(out[0][-3000:])


async def test_telemetry_commands_and_the_will_through_mosquitto(tmp_path: Path, smu: str, broker: Broker) -> None:
    async with Watcher(broker) as w, running(tmp_path, smu, broker) as proc:
        status = await w.until("status", lambda p: p["state"] == "running")
        assert status["run_id"].endswith("-pellet") and status["step"] == "CC Charge"
        await w.until("telemetry", lambda p: p["seq"] >= 5)
        for payload in w.of("telemetry"):  # every message parses against the documented schema
            t = mqtt.Telemetry.model_validate(payload)
            assert t.values["current"].unit == "A" and t.values["current"].value == pytest.approx(0.2e-3, rel=0.01)
        assert w.of("event")[0]["kind"] in ("start", "step_started")
        seq = sequence(w)
        assert seq == list(range(seq[0], seq[-1] + 1))  # continuous: telemetry and events share one sequence

        # a viewer may read but not command: the broker drops it, nothing is paused and nobody answers
        await command(broker, "viewer", "pause", {"id": "v1"})
        await asyncio.sleep(1.5)
        assert not w.of("reply") and ask(smu, ":OUTP?") == "1"

        # an operator pauses; the same correlation ID again is answered again, not executed twice
        await command(broker, "operator", "pause", {"id": "p1", "reason": "bench check"})
        first = await w.until("reply", lambda p: p["id"] == "p1")
        assert first["ok"] and first["command"] == "pause"
        await w.until("status", lambda p: p["state"] == "paused")
        assert ask(smu, ":OUTP?") == "0"
        await command(broker, "operator", "pause", {"id": "p1"})
        await w.until("reply", lambda p: p["id"] == "p1" and len([r for r in w.of("reply") if r["id"] == "p1"]) > 1)
        assert [r for r in w.of("reply") if r["id"] == "p1"] == [first, first]
        # unsafe or impossible commands are refused with a reason; malformed ones too
        await command(broker, "operator", "clear_latch", {"id": "c1"})
        refused = await w.until("reply", lambda p: p["id"] == "c1")
        assert not refused["ok"] and refused["message"] == "refused: channel 'ch1' has no safety latch set"
        await command(broker, "operator", "resume", {"id": "r0", "speed": "fast"})
        bad = await w.until("reply", lambda p: p["id"] == "r0")
        assert not bad["ok"] and "speed" in bad["message"]
        await command(broker, "operator", "resume", {"id": "r1", "reply_to": "cellbench/night/ch1/answers/r1"})
        assert (await w.until("answers/r1", lambda p: True))["ok"]
        await w.until("status", lambda p: p["state"] == "running" and p["time"] > first.get("time", ""))
        await asyncio.to_thread(wait_until_sourcing, smu)
        # a host-driven step has no cycler variables to set
        await command(broker, "operator", "set_variable", {"id": "v2", "name": "MV_UD1", "value": 1.0})
        refused = await w.until("reply", lambda p: p["id"] == "v2")
        assert not refused["ok"] and "run by the bench" in refused["message"]
        assert ask(smu, ":SOUR:CURR?").startswith("2.0")  # 0.2 mA as before

        # the bench process dies a hard death: the broker publishes its will
        proc.send_signal(signal.SIGKILL)
        offline = await w.until("status", lambda p: p["state"] == "offline")
        assert offline["run_id"] == status["run_id"]
        # the will says only what stays true: not the time and step of the connection's start
        assert offline["time"] is None and offline["step"] is None and offline["cycle"] is None
        assert "connection was lost" in offline["reason"]


async def test_a_broker_outage_mid_run_loses_nothing_and_the_run_never_waits(
        tmp_path: Path, smu: str, broker: Broker) -> None:
    async with Watcher(broker) as w, running(tmp_path, smu, broker) as proc:
        await w.until("telemetry", lambda p: p["seq"] >= 3)
        broker.stop()
        await asyncio.sleep(4)  # about 8 samples' telemetry goes to the outbox; the run goes on
        assert proc.poll() is None and ask(smu, ":OUTP?") == "1"
        before = sequence(w)[-1]
        broker.start()
        await w.until("telemetry", lambda p: p["seq"] >= before + 10, timeout=40)
        await w.until("status", lambda p: p["state"] == "running")
        seq = sequence(w)
        assert seq == list(range(seq[0], seq[-1] + 1))  # replayed in order: no gap
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        # a clean stop says where it ended, then offline, itself
        ended = await w.until("status", lambda p: p["state"] == "offline")
        assert ended["reason"].startswith("interrupted")


async def test_standard_clients_read_telemetry_and_send_a_pause(tmp_path: Path, smu: str, broker: Broker) -> None:
    async with Watcher(broker) as w, running(tmp_path, smu, broker):
        sub = await asyncio.to_thread(subprocess.run, [
            "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", "viewer", "-P", "viewer-secret",
            "-t", "cellbench/night/ch1/telemetry", "-C", "1", "-W", "20"], capture_output=True, text=True, timeout=30)
        assert sub.returncode == 0, sub.stderr
        mqtt.Telemetry.model_validate_json(sub.stdout)
        point = telegraf_reads("cellbench/night/ch1/telemetry", sub.stdout)  # the Grafana recipe reads it
        assert (point["bench"], point["channel"]) == ("night", "ch1") and 2.5 < point["voltage_v"] < 4.3
        assert point["current_a"] == pytest.approx(0.2e-3, rel=0.05) and point["step"] == "CC Charge"
        pub = await asyncio.to_thread(subprocess.run, [
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", "operator", "-P", "operator-secret",
            "-q", "1", "-t", "cellbench/night/ch1/cmd/pause", "-m", '{"id": "from-the-shell"}'],
            capture_output=True, text=True, timeout=30)
        assert pub.returncode == 0, pub.stderr
        assert (await w.until("reply", lambda p: p["id"] == "from-the-shell"))["ok"]
        paused = await w.until("status", lambda p: p["state"] == "paused")
        assert telegraf_reads("cellbench/night/ch1/status", json.dumps(paused))["state"] == "paused"


def test_the_documented_schemas_are_the_models_own() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "mqtt.md").read_text()
    assert mqtt.schema_doc() in doc, "docs/mqtt.md is out of date: regenerate its schemas from cellbench.bench.ops.mqtt"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "cellbench", *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200",
                                           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


def test_mqtt_check_tells_a_technician_what_their_credentials_can_do(tmp_path: Path, broker: Broker) -> None:
    bench, _ = bench_file(tmp_path, "TCPIP::127.0.0.1::1::SOCKET", broker)
    good = cli("mqtt", "check", "--bench", str(bench))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok  connect: 127.0.0.1" in good.stdout and "ok  publish cellbench/night/_check/event: read back" in (
        good.stdout)
    url = f"mqtt://viewer@127.0.0.1:{broker.port}"
    viewer = cli("mqtt", "check", "--broker", url, "--password-file", str(broker.password_file("viewer")),
                 "--name", "night")
    assert viewer.returncode == 1
    assert "no  publish cellbench/night/_check/event: not read back" in viewer.stdout
    wrong = tmp_path / "wrong.password"
    wrong.write_text("guess\n")
    denied = cli("mqtt", "check", "--broker", url, "--password-file", str(wrong))
    assert denied.returncode == 1 and "no  connect: 127.0.0.1" in denied.stdout
    bad = cli("mqtt", "check", "--broker", f"mqtt://viewer:secret@127.0.0.1:{broker.port}")
    assert bad.returncode == 2 and "put the password in a file" in bad.stderr and "Traceback" not in bad.stderr


async def test_status_from_the_broker_shows_every_bench(tmp_path: Path, smu: str, broker: Broker) -> None:
    async with Watcher(broker) as w, running(tmp_path, smu, broker):
        await w.until("status", lambda p: p["state"] == "running")
        url = f"mqtt://viewer@127.0.0.1:{broker.port}"
        shown = await asyncio.to_thread(cli, "status", "--broker", url, "--password-file",
                                        str(broker.password_file("viewer")), "--json")
        assert shown.returncode == 0, shown.stderr
        (ch1,) = json.loads(shown.stdout)
        assert (ch1["bench"], ch1["channel"], ch1["state"], ch1["step"]) == ("night", "ch1", "running", "CC Charge")


def test_a_bench_reaches_its_broker_over_tls_and_refuses_a_broker_it_cannot_verify(tmp_path: Path) -> None:
    secure = Broker(tmp_path / "tls-broker", tls=True)
    try:
        bench, _ = bench_file(tmp_path, "TCPIP::127.0.0.1::1::SOCKET", secure)
        text = bench.read_text()
        bench.write_text(text + f"  tls: true\n  ca_file: {secure.ca_file}\n")
        good = cli("mqtt", "check", "--bench", str(bench))
        assert good.returncode == 0, good.stdout + good.stderr
        unverified = tmp_path / "unverified.yaml"
        unverified.write_text(text + "  tls: true\n")  # the system's CAs do not know the test's CA
        bad = cli("mqtt", "check", "--bench", str(unverified))
        assert bad.returncode == 1 and "no  connect" in bad.stdout
        # the same broker by URL, its CA given on the command line (no SSL_CERT_FILE needed)
        url = f"mqtts://bench@127.0.0.1:{secure.port}"
        by_url = cli("mqtt", "check", "--broker", url, "--password-file", str(secure.password_file("bench")),
                     "--ca-file", str(secure.ca_file), "--name", "night")
        assert by_url.returncode == 0, by_url.stdout + by_url.stderr
        unknown_ca = cli("mqtt", "check", "--broker", url, "--password-file", str(secure.password_file("bench")))
        assert unknown_ca.returncode == 1 and "no  connect" in unknown_ca.stdout
        listed = cli("status", "--broker", url, "--password-file", str(secure.password_file("bench")), "--ca-file",
                     str(secure.ca_file), "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout + listed.stderr
        plain = cli("status", "--broker", f"mqtt://127.0.0.1:{secure.port}", "--ca-file", str(secure.ca_file))
        assert plain.returncode == 2 and "a CA file is for mqtts://" in plain.stderr
    finally:
        secure.stop()


def test_an_unreadable_broker_password_is_said_in_one_line_before_anything_is_touched(
        tmp_path: Path, smu: str, broker: Broker) -> None:
    bench, profile = bench_file(tmp_path, smu, broker)
    bench.write_text(bench.read_text().replace(str(broker.password_file("bench")), str(tmp_path / "missing")))
    proc = start_run(tmp_path, bench, profile)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"bench 'night': mqtt password_file {tmp_path / 'missing'}" in out and "Traceback" not in out
    assert ask(smu, ":OUTP?") == "0"


async def test_hostile_commands_are_refused_and_a_full_disk_stops_telemetry_not_the_run(
        tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A link in this process against the test's broker: payloads nested or sized beyond reason get a refusal,
    and an outbox that cannot be written (a full disk) ends the link's telemetry with a log line; closing the
    link then raises nothing, so the run's own end (output off, recorded) stands."""
    import sqlite3

    from cellbench.bench.runtime.events import Note, NoteKind

    cfg = mqtt.MqttConfig(host="127.0.0.1", port=broker.port, username="bench",
                          password_file=broker.password_file("bench"))
    loop = mqtt.MqttLoop()
    link = mqtt.ChannelLink(cfg, "night", "ch1", "run-1", "cell", tmp_path / "o.sqlite",
                            lambda command: (True, "done"), loop)
    try:
        for payload in (b"[" * 200_000, b"{" * 10_000, b'{"id": "x"' + b" " * 20_000 + b"}"):
            reply, _ = await link.answer("pause", payload)
            assert not reply.ok and reply.message.startswith("refused:")
        reply, _ = await link.answer("pause", b'{"id": "ok-1"}')
        assert reply.ok  # the link still answers

        def full(self: object, rows: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(mqtt.Outbox, "_add", full)
        link.on_event(Note(NoteKind.NOTICE, "something", 1.0, time.time()))
        stopped = asyncio.wrap_future(link._done)
        await asyncio.wait([stopped], timeout=10)
        assert stopped.done() and isinstance(stopped.exception(), sqlite3.OperationalError)
        await link.close("completed", None)  # raises nothing
        assert "MQTT telemetry stopped" in caplog.text and "disk is full" in caplog.text
    finally:
        loop.stop()


def test_the_outbox_is_bounded_drops_the_oldest_telemetry_first_and_keeps_its_count(tmp_path: Path) -> None:
    box = mqtt.Outbox(tmp_path / "outbox.sqlite", limit=5)
    box.turn([(1, "t/event", "e1", 1, 0)] + [(k, "t/telemetry", f"m{k}", 0, 1) for k in range(2, 6)], 0, 0)
    head = box.turn([(k, "t/telemetry", f"m{k}", 0, 1) for k in range(6, 9)], 0, 10)  # three too many
    assert len(box) == 5
    assert [seq for seq, *_ in head] == [1, 5, 6, 7, 8]  # the event stays; telemetry 2-4 went
    head = box.turn([], 5, 10)  # the broker took 1 and 5
    assert len(box) == 3 and [seq for seq, *_ in head] == [6, 7, 8]
    box.close()
    again = mqtt.Outbox(tmp_path / "outbox.sqlite", limit=5)  # reopened (a resume): the count is the file's
    assert len(again) == 3 and again.last_seq() == 8
    again.close()


async def test_telemetry_and_events_go_out_in_sequence_order(tmp_path: Path, broker: Broker) -> None:
    """A burst of telemetry (QoS 0, handed to the client in runs) with events (QoS 1) among it reaches a
    subscriber whole and in the order of the sequence numbers."""
    from cellbench.bench.runtime.events import Note, NoteKind, Sample, SampleTaken

    cfg = mqtt.MqttConfig.model_construct(**{**mqtt.MqttConfig(
        host="127.0.0.1", port=broker.port, username="bench", password_file=broker.password_file("bench"),
    ).model_dump(), "telemetry_every": 0.0})
    loop = mqtt.MqttLoop()
    def obey(command: Command) -> tuple[bool, str]:
        return True, "done"

    link = mqtt.ChannelLink(cfg, "night", "ch1", "run-1", "cell", tmp_path / "o.sqlite", obey, loop)
    try:
        async with Watcher(broker) as w:
            await w.until("status", lambda p: p["state"] == "starting")
            for i in range(3000):
                t = float(i)
                link.on_event(SampleTaken(Sample(t, time.time(), 3.7, 1e-3, 1, 1, 1, "CC Charge", 0, 0, 0, 0)))
                if i % 700 == 350:
                    link.on_event(Note(NoteKind.NOTICE, f"note at {i}", t, time.time()))
                if i % 100 == 0:
                    await asyncio.sleep(0)
            await w.until("telemetry", lambda p: p["seq"] == 3004)  # 3,000 samples and 4 notes
            got = [p["seq"] for t, p, _ in w.messages if t.endswith(("/telemetry", "/event"))]
            assert got == list(range(1, 3005))
            assert [p["message"] for p in w.of("event")] == [f"note at {i}" for i in range(350, 3000, 700)]
            await link.close("completed", None)
    finally:
        loop.stop()


async def test_set_variable_steers_the_schedule_the_cycler_runs(tmp_path: Path, broker: Broker) -> None:
    """A `cellbench run` on a served Arbin runs the cycler's own schedule; an operator's set_variable over MQTT
    changes its charge current (MV_UD1) mid-step, the telemetry shows it and the run records who changed what.
    A variable that is not one, or a value that is not a number, is refused with its reason."""
    proc_sim, m = announced("arbin", "--port", "0", "--channels", "1", "--login", "tester:s3cret", "--soc", "0.3",
                            pattern=r"(TCPIP::127\.0\.0\.1::\d+::SOCKET)")
    login = tmp_path / "arbin.login"
    login.write_text("tester:s3cret\n")
    bench = tmp_path / "bench.yaml"
    bench.write_text(f"""
name: night
instruments:
  a1: {{driver: arbin, resource: "{m.group(1)}", login_file: {login}}}
cells:
  pellet: {{capacity: 3.5 mAh, voltage_min: 2.5 V, voltage_max: 4.3 V}}
channels:
  ch1: {{cycler: a1, cycler_channel: 0, cell: pellet}}
""" + mqtt_section(broker))
    profile = tmp_path / "formation.yaml"
    profile.write_text("name: formation on the cycler\nsample_period: 0.5 s\n"
                       "steps:\n  - schedule: {name: Formation_C10.sdx, until: 2 h}\n")
    proc = start_run(tmp_path, bench, profile)
    try:
        async with Watcher(broker) as w:
            before = await w.until("telemetry", lambda p: p["step"] == "Schedule" and p["seq"] >= 4)
            assert before["values"]["current"]["value"] == pytest.approx(0.35e-3, rel=1e-3)  # the C/10 default
            for ident, payload, why in (("x1", {"name": "MV_UD17", "value": 1}, "name: the cycler variable"),
                                        ("x2", {"name": "1", "value": "fast"}, "value: a number")):
                await command(broker, "operator", "set_variable", {"id": ident, **payload})
                bad = await w.until("reply", equal("id", ident))
                assert not bad["ok"] and bad["message"].startswith(f"refused: {why}")
            await command(broker, "operator", "set_variable",
                          {"id": "v1", "name": "MV_UD1", "value": 0.0007, "reason": "faster formation"})
            done = await w.until("reply", lambda p: p["id"] == "v1")
            assert done["ok"] and done["message"] == "variable 1 set to 0.0007 in step 1"
            after = await w.until("telemetry", lambda p: p["seq"] > before["seq"]
                                  and p["values"]["current"]["value"] > 0.5e-3)
            assert after["values"]["current"]["value"] == pytest.approx(0.7e-3, rel=1e-3)
            note = await w.until("event", lambda p: "set to 0.0007" in p["message"])
            assert note["kind"] == "schedule" and "by the operator (faster formation)" in note["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out = await asyncio.to_thread(proc.communicate, timeout=30)
        proc_sim.terminate()
        proc_sim.wait(timeout=10)
    assert proc.returncode != 0, out[0][-2000:]  # interrupted, not completed


TRIP = """
name: trip on charge
sample_period: 0.5 s
safety: {voltage: [2.5 V, 3.74 V]}
steps:
  - charge: {current: 1 mA, until: 2 h}
"""


async def test_a_bench_that_holds_on_a_safety_stop_waits_latched_until_an_operator_clears_it(
        tmp_path: Path, smu: str, broker: Broker) -> None:
    """on_safety_stop: hold. The cell's voltage rises over the profile's safety limit on charge (3.70 V at
    rest, 3.76 V at 1 mA): the channel is held, output off and latched, its controller still running. A resume
    is refused while latched; clear_latch clears it (recorded) and the channel stays paused; a resume then
    carries on, and the same limit trips it again. Aborted while latched, the record stays latched."""
    from cellbench.bench.runner.run import read_for_resume
    from cellbench.bench.runtime.store import open_run
    from cellbench.profiles.parse import InputError

    bench, profile = bench_file(tmp_path, smu, broker)
    told = tmp_path / "told.jsonl"
    bench.write_text(bench.read_text() + f"on_safety_stop: hold\nnotify: [sh, -c, 'cat >> {told}']\n")
    profile.write_text(TRIP)
    proc = start_run(tmp_path, bench, profile)

    def held(trips: int) -> bool:
        """Tripped `trips` times (events: never coalesced, as a quickly replaced status may be) and held again:
        the runs registry says paused, which is what another terminal goes by."""
        entries = [json.loads(p.read_text()) for p in (tmp_path / "state" / "runs").glob("*.json")]
        ends = [p for p in w.of("event") if p["kind"] == "end" and p["message"].startswith("safety stop")]
        return (len(ends) == trips
                and [e["state"] for e in entries] == ["paused"])

    async def until_held(trips: int) -> None:
        deadline = time.monotonic() + 20
        while not held(trips) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert held(trips) and ask(smu, ":OUTP?") == "0" and proc.poll() is None, w.of("event")[-3:]

    try:
        async with Watcher(broker) as w:
            first = await w.until("status", lambda p: p["state"] == "latched")  # (it stays so until cleared)
            assert "outside the profile's safety range 2.5 to 3.74 V" in first["reason"], first
            await until_held(1)  # held, not ended
            await command(broker, "operator", "resume", {"id": "r1"})
            refused = await w.until("reply", lambda p: p["id"] == "r1")
            assert not refused["ok"] and "latched" in refused["message"] and "clear the latch" in refused["message"]
            await command(broker, "operator", "clear_latch", {"id": "c1", "reason": "cell checked by J. Doe"})
            cleared = await w.until("reply", lambda p: p["id"] == "c1")
            assert cleared["ok"], cleared
            await w.until("status", lambda p: p["state"] == "paused" and "J. Doe" in (p["reason"] or ""))
            assert ask(smu, ":OUTP?") == "0" and proc.poll() is None
            await command(broker, "operator", "resume", {"id": "r2"})
            assert (await w.until("reply", lambda p: p["id"] == "r2"))["ok"]
            await w.until("event", lambda p: p["kind"] == "resumed")
            await until_held(2)
            # from another terminal: a plain resume is refused; with --clear-latch it clears, resumes, trips again
            plain = await asyncio.to_thread(terminal, tmp_path, "resume", "ch1")
            assert plain.returncode == 1 and "latched" in plain.stderr + plain.stdout
            cleared_here = await asyncio.to_thread(terminal, tmp_path, "resume", "ch1", "--clear-latch")
            assert cleared_here.returncode == 0, cleared_here.stderr
            assert "latch cleared" in cleared_here.stdout and "resumes" in cleared_here.stdout
            await until_held(3)
            # aborted while latched: the run ends in its safety stop, still latched, and the controller goes
            await command(broker, "operator", "abort", {"id": "a1", "reason": "cell taken off the bench"})
            aborted = await w.until("reply", lambda p: p["id"] == "a1")
            assert aborted["ok"] and "still latched" in aborted["message"], aborted
            await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode != 0, out[0][-2000:]
    (db,) = (p for p in (tmp_path / "runs").glob("*.sqlite") if not p.name.endswith(".outbox.sqlite"))
    with pytest.raises(InputError, match="clears the latch"):
        read_for_resume(db)  # aborted while latched: the record stays latched
    with open_run(db) as store:
        kinds = [e["kind"] for e in store.events()]
    assert kinds.count("safety") == 3 and kinds.count("latch cleared") == 2 and kinds.count("resumed") == 2
    # the bench's notify command was run at each trip (someone must come), and once at the end
    said = [json.loads(line) for line in told.read_text().splitlines() if line.strip()]
    assert [p["state"] for p in said] == ["latched"] * 3 + ["safety stop"]
    assert all("safety range 2.5 to 3.74 V" in p["reason"] for p in said)


async def test_telemetry_keeps_the_wall_clocks_time_and_flows_again_at_once_after_a_pause(
        tmp_path: Path, smu: str, broker: Broker) -> None:
    """Before the clock kept one origin pair, a resume stamped telemetry in the past and held it back for the
    test time at the pause plus the pause's length: a subscriber saw nothing, then times from minutes ago."""
    async with Watcher(broker) as w, running(tmp_path, smu, broker):
        await w.until("telemetry", lambda p: p["test_time"] >= 4.0)
        await command(broker, "operator", "pause", {"id": "p1"})
        await w.until("status", lambda p: p["state"] == "paused")
        await asyncio.sleep(5.0)
        await command(broker, "operator", "resume", {"id": "r1"})
        await w.until("reply", lambda p: p["id"] == "r1" and p["ok"])
        resumed = time.time()
        await w.until("telemetry", lambda p: datetime.fromisoformat(p["time"]).timestamp() > resumed, timeout=5.0)
        late = [p for p in w.of("telemetry") if datetime.fromisoformat(p["time"]).timestamp() > resumed]
        assert abs(datetime.fromisoformat(late[0]["time"]).timestamp() - time.time()) < 2.0
        times = [datetime.fromisoformat(p["time"]).timestamp() for p in w.of("telemetry")]
        assert times == sorted(times)


async def test_telemetry_keeps_its_own_cadence_when_the_profile_samples_seldom(
        tmp_path: Path, smu: str, broker: Broker) -> None:
    """telemetry_every 0.5 s on a profile that samples every 20 s: telemetry follows the channel's newest reading
    (the supervisor reads it at least once a second), not the recorded samples, and never repeats a reading."""
    seldom = "name: seldom\nsample_period: 20 s\nsteps:\n  - charge: {current: 0.2 mA, until: [4.2 V, 2 h]}\n"
    bench, profile = files(tmp_path, smu, more=mqtt_section(broker), profile_text=seldom)
    async with Watcher(broker) as w:
        proc = start_run(tmp_path, bench, profile)
        try:
            await asyncio.to_thread(wait_until_sourcing, smu)
            await asyncio.sleep(6.0)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.communicate, timeout=30)
        telemetry = [p for p in w.of("telemetry") if p["step"] == "CC Charge"]
        test_times = [p["test_time"] for p in telemetry]
        assert len(telemetry) >= 4, test_times  # 6 s at a 20 s sample period: one or two recorded samples
        assert len(set(test_times)) == len(test_times)  # each reading once
        assert all(b - a >= 0.4 for a, b in itertools.pairwise(test_times)), test_times


async def test_qos_1_telemetry_loses_nothing_across_broker_restarts(tmp_path: Path, smu: str) -> None:
    """telemetry_qos: 1 keeps every telemetry message in the outbox until the broker acknowledges it: at 10 Hz,
    three broker restarts leave no gap in the sequence a subscriber sees (QoS 0 may lose the few written to the
    socket as the broker went down: docs/mqtt.md says which promise holds)."""
    fast = "name: fast\nsample_period: 0.1 s\nsteps:\n  - charge: {current: 0.2 mA, until: [4.2 V, 2 h]}\n"
    # the subscriber is the oracle: a persistent session on a persistent broker, so that what the bench sends
    # while the subscriber itself is still reconnecting is kept for it (it once looked like a loss)
    broker = Broker(tmp_path / "persistent-broker", persistent=True)
    section = mqtt_section(broker).replace("telemetry_every: 0.5 s", "telemetry_every: 0.1 s") + "  telemetry_qos: 1\n"
    bench, profile = files(tmp_path, smu, more=section, profile_text=fast)
    async with Watcher(broker, session="qos1-oracle") as w:
        proc = start_run(tmp_path, bench, profile)
        try:
            await w.until("telemetry", lambda p: p["seq"] >= 10)
            for _ in range(3):
                broker.stop(gently=True)
                await asyncio.sleep(1.0)
                before = sequence(w)[-1]
                broker.start()
                await w.until("telemetry", at_least("seq", before + 20), timeout=40)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.communicate, timeout=30)
            broker.stop()
        seq = sequence(w)
        assert len(seq) > 60 and seq == list(range(seq[0], seq[-1] + 1))  # nothing lost, replayed in order


async def test_each_finished_cycle_is_a_retained_message_with_its_capacities_and_efficiency(
        tmp_path: Path, smu: str, broker: Broker) -> None:
    """Short whole cycles (each half ended on its capacity): the retained `cycle` message carries the cycle's
    charge and discharge (equal to the run database's per-cycle table) and its efficiency, discharge over charge,
    by hand; a subscriber that comes later gets it from the broker. A cycle ended on time (pulses) carries none."""
    from cellbench.bench.results.analysis import cycle_table
    from cellbench.bench.runtime.store import open_run

    cycles = ("name: cycles\nsample_period: 0.2 s\nsteps:\n  - repeat: 3\n    steps:\n"
              "      - charge: {current: 0.5 mA, until: [4.2 V, 0.000278 mAh]}\n"  # 2 s at 0.5 mA
              "      - discharge: {current: 0.5 mA, until: [2.5 V, 0.000208 mAh]}\n")  # 1.5 s
    bench, profile = files(tmp_path, smu, more=mqtt_section(broker), profile_text=cycles)
    proc = start_run(tmp_path, bench, profile)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out[-2000:]
    async with Watcher(broker) as w:  # after the run: the retained message is still there
        message = await w.until("cycle", lambda p: True)
    (db,) = [p for p in (tmp_path / "runs").glob("*.sqlite") if not p.name.endswith(".outbox.sqlite")]
    with open_run(db) as store:
        table = {r.cycle: r for r in cycle_table(store.samples())}
    assert message["cycle"] == 2  # the third cycle ended with the run, not with a next one
    row = table[message["cycle"]]
    assert message["charge"] == {"value": pytest.approx(row.charge_ah, rel=1e-9), "unit": "Ah"}
    assert message["discharge"]["value"] == pytest.approx(row.discharge_ah, rel=1e-9)
    assert message["coulombic_efficiency"] == pytest.approx(row.discharge_ah / row.charge_ah, rel=1e-9)
    assert 0.5 < message["coulombic_efficiency"] < 1.0  # 1.5 s back of 2 s in, by hand: 0.75
    # no discharge reached its voltage limit, so none measured a reference capacity; no impedance step, no fit
    assert message["retention"] is None and message["resistance"] is None
    point = telegraf_reads("cellbench/night/ch1/cycle", json.dumps(message))  # the Grafana recipe reads it
    assert point["coulombic_efficiency"] == message["coulombic_efficiency"] and "retention" not in point


async def test_a_paused_channel_takes_commands_again_after_a_broker_restart(
        tmp_path: Path, smu: str, broker: Broker) -> None:
    """A paused channel publishes nothing, so its link once never noticed the broker had gone and never
    reconnected: a `resume` sent after the restart went unanswered. The link watches its connection itself."""
    async with Watcher(broker) as w, running(tmp_path, smu, broker):
        await w.until("telemetry", lambda p: p["test_time"] >= 2.0)
        await command(broker, "operator", "pause", {"id": "p1"})
        await w.until("status", lambda p: p["state"] == "paused")
        broker.stop()
        await asyncio.sleep(1.0)
        broker.start()
        await asyncio.sleep(3.0)  # the bench's reconnect backoff starts at 1 s
        await command(broker, "operator", "resume", {"id": "r-after-restart"})
        await w.until("reply", lambda p: p["id"] == "r-after-restart" and p["ok"], timeout=20)
        await w.until("status", lambda p: p["state"] == "running", timeout=10)


async def test_a_cycle_of_pulses_carries_no_efficiency(tmp_path: Path, smu: str, broker: Broker) -> None:
    """Cycles whose halves end on time (pulses, an HPPC): discharge over charge is no efficiency (16,278 % was
    reported for an HPPC run): the `cycle` message says null, as the per-cycle table leaves it blank."""
    pulses = ("name: pulses\nsample_period: 0.2 s\nsteps:\n  - repeat: 3\n    steps:\n"
              "      - charge: {current: 0.5 mA, until: [4.2 V, 1 s]}\n"
              "      - discharge: {current: 1 mA, until: [2.5 V, 1.5 s]}\n")
    bench, profile = files(tmp_path, smu, more=mqtt_section(broker), profile_text=pulses)
    proc = start_run(tmp_path, bench, profile)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out[-2000:]
    async with Watcher(broker) as w:
        message = await w.until("cycle", lambda p: True)
    assert message["cycle"] == 2 and message["charge"]["value"] > 0 and message["discharge"]["value"] > 0
    assert message["coulombic_efficiency"] is None


def readme_mqtt_block(tmp_path: Path, smu: str, broker: Broker) -> tuple[list[str], Broker, Path]:
    """The README's MQTT lines, a TLS broker for its `mqtts://` line, and a home with `~/.mqtt-pass`,
    `lab-ca.pem` and `BENCH.yaml` (the bench on the served 2450, publishing to the test's broker)."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## A lab's benches on one broker"):readme.index("## From Python")]
    lines = [line.split("  #")[0].strip() for line in re.findall(r"```sh\n(.*?)```", section, re.S)[0].splitlines()]
    assert len(lines) == 5 and all("broker.lab" in line or "BENCH.yaml" in line for line in lines), lines
    secure = Broker(tmp_path / "tls-broker", tls=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".mqtt-pass").write_text("viewer-secret\n")
    assert secure.ca_file is not None
    (tmp_path / "lab-ca.pem").write_bytes(secure.ca_file.read_bytes())
    bench, _ = bench_file(tmp_path, smu, broker)
    (tmp_path / "BENCH.yaml").write_text(bench.read_text())
    return lines, secure, home


async def test_the_readmes_mqtt_block_runs_against_a_broker_of_our_own(tmp_path: Path, smu: str,
                                                                       broker: Broker) -> None:
    """Every line of the README's MQTT block, with the lab's names put in: its broker (`broker.lab`) is the
    test's Mosquitto (and one with TLS for the `mqtts://` line), `grafana` and `night-shift` are its read-only
    and operator users, `ch03` the running bench's channel. Each ends with exit 0 and does what its comment says:
    the check passes, status lists the bench, a standard client receives telemetry, the pause is obeyed."""
    import shlex

    lines, secure, home = readme_mqtt_block(tmp_path, smu, broker)

    def as_here(line: str) -> list[str]:
        line = (line.replace("broker.lab:1883", f"127.0.0.1:{broker.port}")
                .replace("mqtts://grafana@broker.lab", f"mqtts://grafana@127.0.0.1:{secure.port}")
                .replace("-h broker.lab", f"-h 127.0.0.1 -p {broker.port}")
                .replace("grafana", "viewer").replace("night-shift", "operator").replace("ch03", "ch1"))
        words = shlex.split(line.replace("~/", f"{home}/"))
        if "-P" in words:
            words[words.index("-P") + 1] = f"{words[words.index('-u') + 1]}-secret"
        if words[0] == "mosquitto_sub":
            words += ["-C", "1", "-W", "20"]  # one message, then it ends
        if words[0] == "cellbench":
            words = [sys.executable, "-m", "cellbench", *words[1:]]
        return words

    try:
        async with Watcher(broker) as w, running(tmp_path, smu, broker):
            said = []
            for line in lines:
                done = await asyncio.to_thread(subprocess.run, as_here(line), capture_output=True, text=True,
                                               timeout=60, cwd=tmp_path, env=run_env(tmp_path))
                assert done.returncode == 0, f"{line}\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
                said.append(done.stdout)
            check, status, tls_status, sub, _ = said
            assert "ch1" in status and "night" in status and "ch1" not in tls_status  # no bench on the TLS broker
            assert "connect" in check
            mqtt.Telemetry.model_validate_json(sub)
            await w.until("status", lambda p: p["state"] == "paused")
    finally:
        secure.stop()
