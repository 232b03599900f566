"""MQTT telemetry against the floor: messages per second and 99th-percentile latency through Mosquitto, from
the engine's subscriber (ChannelLink: outbox on disk, publisher task) and from a bare paho-mqtt publish loop,
in one run, with their ratio. Also what the control loop pays per sample in `on_event`.

A Mosquitto of its own on a free loopback port (the test suite's generated configuration), a paho subscriber
on its own thread stamping arrival times. Run: .venv/bin/python benchmarks/mqtt_telemetry.py [messages]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellbench.bench.events import Sample, SampleTaken
from cellbench.bench.mqtt import ChannelLink, MqttConfig, MqttLoop
from tests.broker import Broker

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000


class Receiver:
    """A paho subscriber on its own thread: arrival time of every message on a topic."""

    def __init__(self, port: int, topic: str) -> None:
        self.arrived: list[tuple[float, bytes]] = []
        self.done = threading.Event()
        self.expect = 0
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.username_pw_set("viewer", "viewer-secret")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=0)
        subscribed.wait(10)

    def _on_message(self, client: object, userdata: object, msg: paho.MQTTMessage) -> None:
        self.arrived.append((time.time(), msg.payload))
        if len(self.arrived) >= self.expect:
            self.done.set()

    def reset(self, expect: int) -> None:
        self.arrived, self.expect = [], expect
        self.done.clear()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def sent_at(payload: bytes) -> float:
    stamp = json.loads(payload)["time"]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def figures(rx: Receiver, t0: float) -> tuple[float, float]:
    """(messages per second from the first publish to the last arrival, p99 latency in ms)."""
    last = rx.arrived[-1][0]
    latencies = sorted((at - sent_at(p)) * 1e3 for at, p in rx.arrived)
    return len(rx.arrived) / (last - t0), latencies[int(0.99 * (len(latencies) - 1))]


async def ours(port: int, rx: Receiver, folder: Path) -> tuple[float, float, float]:
    cfg = MqttConfig.model_construct(**{**MqttConfig(host="127.0.0.1", port=port, username="bench").model_dump(),
                                        "telemetry_every": 0.0})
    object.__setattr__(cfg, "password_file", folder / "bench.password")
    (folder / "bench.password").write_text("bench-secret\n")
    mqtt_loop = MqttLoop()
    link = ChannelLink(cfg, "perf", "ch1", "run", "cell", folder / "outbox.sqlite",
                       lambda a, c, r: (False, "no"), mqtt_loop)
    while not link.connected:  # noqa: ASYNC110  (the link offers no event for it; a benchmark may poll)
        await asyncio.sleep(0.01)
    rx.reset(N)
    loop_time = 0.0
    t0 = time.time()
    for i in range(N):
        s = Sample(float(i), time.time(), 3.7, 1e-3, 1, 1, 1, "CC Charge", i * 1e-9, 0.0, 0.0, 0.0)
        c0 = time.perf_counter()
        link.on_event(SampleTaken(s))
        loop_time += time.perf_counter() - c0
        if i % 200 == 199:
            await asyncio.sleep(0)  # a control loop that samples: the link runs between samples
    await asyncio.to_thread(rx.done.wait, 120)
    rate, p99 = figures(rx, t0)
    await link.close("completed", None)
    mqtt_loop.stop()
    return rate, p99, loop_time / N * 1e6


def bare(port: int, rx: Receiver) -> tuple[float, float]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.username_pw_set("bench", "bench-secret")
    client.connect("127.0.0.1", port)
    client.loop_start()
    rx.reset(N)
    t0 = time.time()
    for i in range(N):
        payload = json.dumps({"time": datetime.fromtimestamp(time.time()).astimezone().isoformat(), "seq": i + 1,
                              "values": {"voltage": {"value": 3.7, "unit": "V"}}})
        client.publish("cellbench/perf/ch1/telemetry", payload, qos=0)
    rx.done.wait(120)
    client.loop_stop()
    client.disconnect()
    return figures(rx, t0)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "broker")
        rx = Receiver(broker.port, "cellbench/perf/ch1/telemetry")
        try:
            rows = []
            for _ in range(3):  # interleaved repeats: the machine is shared
                rows.append((*asyncio.run(ours(broker.port, rx, Path(tmp))), *bare(broker.port, rx)))
        finally:
            rx.close()
            broker.stop()
    for o_rate, o_p99, loop_us, b_rate, b_p99 in rows:
        print(f"ours {o_rate:9,.0f} msg/s p99 {o_p99:7.1f} ms ({loop_us:.1f} us on the loop per sample) | "
              f"bare paho {b_rate:9,.0f} msg/s p99 {b_p99:7.1f} ms | ratio {o_rate / b_rate:.2f}")
    o = statistics.median(r[0] for r in rows)
    b = statistics.median(r[3] for r in rows)
    print(f"median over {len(rows)} runs of {N:,} messages: ours {o:,.0f} msg/s, bare {b:,.0f} msg/s, "
          f"ratio {o / b:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
