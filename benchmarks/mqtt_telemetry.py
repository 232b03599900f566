"""MQTT telemetry against the floor: messages per second and 99th-percentile latency through Mosquitto, from
the engine's subscriber (ChannelLink: outbox on disk, publisher task) and from a bare paho-mqtt publish loop,
in one run, with their ratio. Also what the control loop pays per sample in `on_event`.

A Mosquitto of its own on a free loopback port (the test suite's generated configuration), a paho subscriber
in a process of its own (as a dashboard would be) stamping arrival times.
Run: .venv/bin/python benchmarks/mqtt_telemetry.py [messages]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import own_state  # noqa: F401  (first: a state folder of its own)
import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellbench.bench.ops.mqtt import ChannelLink, MqttConfig, MqttLoop
from cellbench.bench.runtime.events import Sample, SampleTaken
from tests.broker import Broker

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000


RECEIVER = r"""
import json, sys, threading, time
from datetime import datetime
import paho.mqtt.client as paho

port, topic = int(sys.argv[1]), sys.argv[2]
state = {"expect": 0, "got": []}
done = threading.Event()

def on_message(client, userdata, msg):
    if state["expect"] and len(state["got"]) < state["expect"]:
        state["got"].append((time.time(), msg.payload))
        if len(state["got"]) >= state["expect"]:
            done.set()

client = paho.Client(paho.CallbackAPIVersion.VERSION2)
client.username_pw_set("viewer", "viewer-secret")
client.on_message = on_message
ready = threading.Event()
client.on_subscribe = lambda *a: ready.set()
client.connect("127.0.0.1", port)
client.loop_start()
client.subscribe(topic, qos=0)
ready.wait(10)
print("ready", flush=True)
for line in sys.stdin:
    done.clear()
    state["got"], state["expect"] = [], int(line)
    print("armed", flush=True)
    done.wait(120)
    sent = [datetime.fromisoformat(json.loads(p)["time"].replace("Z", "+00:00")).timestamp() for _, p in state["got"]]
    print(json.dumps({"last": state["got"][-1][0], "latencies_ms": [(a - s) * 1e3 for (a, _), s in
                                                                    zip(state["got"], sent)]}), flush=True)
"""


class Receiver:
    """A paho subscriber in a process of its own (as Grafana or a LIMS would be): arrival time of every message."""

    def __init__(self, port: int, topic: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), topic], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def reset(self, expect: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{expect}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "armed"

    def wait(self) -> tuple[float, list[float]]:
        assert self.proc.stdout is not None
        got = json.loads(self.proc.stdout.readline())
        return got["last"], got["latencies_ms"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def figures(rx: Receiver, t0: float) -> tuple[float, float]:
    """(messages per second from the first publish to the last arrival, p99 latency in ms)."""
    last, latencies = rx.wait()
    latencies.sort()
    return len(latencies) / (last - t0), latencies[int(0.99 * (len(latencies) - 1))]


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
    rate, p99 = await asyncio.to_thread(figures, rx, t0)
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
    result = figures(rx, t0)
    client.loop_stop()
    client.disconnect()
    return result


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
