"""MQTT seen from a terminal: every bench's status on a broker, a bench's credentials checked, the schemas."""


from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from pydantic import ValidationError

from cellbench.bench.ops.mqtt.config import MqttConfig
from cellbench.bench.ops.mqtt.payloads import PAYLOADS, Status

log = logging.getLogger(__name__)


async def statuses(cfg: MqttConfig, wait: float = 2.0) -> list[Status]:
    """Every channel's retained status on the broker (all benches under the prefix), read for `wait` seconds."""
    import aiomqtt

    found: dict[str, Status] = {}
    async with aiomqtt.Client(**cfg.client_kwargs(), identifier=None) as client:
        await client.subscribe(f"{cfg.prefix}/+/+/status", qos=1)

        async def read() -> None:
            async for m in client.messages:
                try:
                    found[str(m.topic)] = Status.model_validate_json(bytes(m.payload or b""))
                except ValidationError:
                    continue  # someone else's message under the prefix

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read(), wait)
    return sorted(found.values(), key=lambda st: (st.bench, st.channel))


async def check(cfg: MqttConfig, bench: str, wait: float = 3.0) -> list[tuple[str, bool, str]]:
    """Whether these credentials can do what a bench does: connect, take commands, publish and be read back."""
    import aiomqtt

    results: list[tuple[str, bool, str]] = []
    probe = f"{cfg.prefix}/{bench}/_check/event"
    try:
        async with aiomqtt.Client(**cfg.client_kwargs(), identifier=None) as client:
            results.append(("connect", True, f"{cfg.host}:{cfg.port} as {cfg.username or 'anonymous'}"))
            for topic in (f"{cfg.prefix}/{bench}/+/cmd/+", probe):
                try:
                    granted = await client.subscribe(topic, qos=1)
                    refused = any(_failed(code) for code in (granted or ()))
                    results.append((f"subscribe {topic}", not refused, "refused by the broker" if refused
                                    else "granted"))
                except aiomqtt.MqttError as exc:
                    results.append((f"subscribe {topic}", False, f"refused by the broker ({exc})"))
            token = f"cellbench check {time.time()}"
            await client.publish(probe, json.dumps({"check": token}), qos=1)

            async def echo() -> bool:
                async for m in client.messages:
                    if str(m.topic) == probe and token in bytes(m.payload or b"").decode(errors="replace"):
                        return True
                return False

            try:
                back = await asyncio.wait_for(echo(), wait)
            except TimeoutError:
                back = False
            results.append((f"publish {probe}", back, "read back" if back else
                            f"not read back within {wait:g} s: the broker's ACL drops this user's publishing there"))
    except aiomqtt.MqttError as exc:
        results.append(("connect", False, f"{cfg.host}:{cfg.port}: {exc}"))
    return results


def _failed(code: object) -> bool:
    """A SUBACK's code for one topic: 0x80 and above refuse it (an int in MQTT 3.1.1, a ReasonCode in 5)."""
    value = getattr(code, "value", code)
    return isinstance(value, int) and value >= 0x80


def schema_doc() -> str:
    """The JSON Schemas of every payload, as docs/mqtt.md lists them."""
    parts = []
    for topic, model in PAYLOADS.items():
        parts.append(f"### `{topic}`: {model.__name__}\n\n```json\n"
                     f"{json.dumps(model.model_json_schema(), indent=2)}\n```\n")
    return "\n".join(parts)
