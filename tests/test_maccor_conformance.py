"""Maccor MacNet as the vendor's help says it ("Remote Control - MacNet"), not as our simulator and driver agree:
the direct-mode rules of (6, 7) and (6, 8) (page 48: at least 100 ms between commands, "direct mode is not ready
yet", the MacNetDirectModeWD watchdog), (8, 1) log in (page 93), replies printed over several CR LF lines, and
binary function class 0 (page 9: "the received message will be replied as is")."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from typing import Any

import pytest

from cellbench.bench.runtime.clock import VirtualClock
from cellbench.drivers.errors import InstrumentError
from cellbench.drivers.maccor import MacNetBox
from cellbench.simulators.cell import SolidStateCell
from cellbench.simulators.maccor import ACTIVE, SUSPENDED, MaccorServer, MaccorSim


def box_sim(loop: asyncio.AbstractEventLoop, **options: Any) -> MaccorSim:
    return MaccorSim([SolidStateCell(soc=0.5) for _ in range(4)], loop.time, **options)


def test_page_48_direct_mode_commands_are_100_ms_apart_and_not_ready_is_waited_out() -> None:
    """Our driver's (6, 7) then (6, 8) to one channel: every direct-mode command at least 100 ms after the last,
    a refusal ("too fast", "not ready yet") waited out and sent again, and the setpoint taken in the end."""

    async def main() -> tuple[list[tuple[float, str]], float]:
        loop = asyncio.get_running_loop()
        sim = box_sim(loop)
        sent: list[tuple[float, str]] = []
        answer = sim.answer

        def watched(request: Any, session: dict[str, bool] | None = None) -> dict[str, Any]:
            reply = answer(request, session)
            p = request["params"]
            if (p["FClass"], p["FNum"]) in ((6, 7), (6, 8)):
                sent.append((loop.time(), str(reply.get("result", {}).get("Result"))))
            return reply

        sim.answer = watched  # type: ignore[method-assign]
        async with MaccorServer(sim) as server:
            box = await MacNetBox.open(server.resource, name="box", bin_port=server.bin_port)
            try:
                await box.channel(1).source_current(1e-3, voltage_limit=4.2)
                await asyncio.sleep(1.0)
                current = (await box.channel(1).measure()).current
            finally:
                await box.close()
        return sent, current

    sent, current = VirtualClock().run(main())
    assert sent[0][1] == "OK" and sent[-1][1] == "OK"  # (6, 7), then the setpoint taken
    assert any("not ready" in said for _, said in sent), sent  # the box said wait, and the driver waited
    assert all(b - a >= 0.1 - 1e-9 for (a, _), (b, _) in itertools.pairwise(sent)), sent
    assert sent[-1][0] - sent[0][0] >= 0.25 - 1e-9  # not before the pseudo test procedure is ready
    assert current == pytest.approx(1e-3)


@pytest.mark.parametrize("refreshed", [True, False])
def test_page_48_a_channel_not_updated_within_the_watchdog_is_suspended_unless_the_driver_refreshes_it(
        refreshed: bool) -> None:
    """MacNetDirectModeWD = 2 s on the box; a charge step sampled once a minute. With the bench file's `watchdog`
    the driver sends the setpoint again within it and the channel charges on; without, the box suspends it."""

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        sim = box_sim(loop, watchdog_s=2.0)
        async with MaccorServer(sim) as server:
            box = await MacNetBox.open(server.resource, name="box", bin_port=server.bin_port,
                                       watchdog=2.0 if refreshed else None)
            try:
                await box.channel(2).source_current(1e-3, voltage_limit=4.2)
                await asyncio.sleep(60.0)
                sim.advance()  # the box's time goes on whether anyone asks or not
                return sim.channels[2].stat, sim.channels[2].reading[0]
            finally:
                await box.close()

    stat, current = VirtualClock().run(main())
    if refreshed:
        assert stat == ACTIVE and current == pytest.approx(1e-3)
    else:
        assert stat == SUSPENDED and current == 0.0


async def test_page_93_a_box_with_authentication_takes_nothing_before_a_log_in() -> None:
    loop = asyncio.get_running_loop()
    sim = box_sim(loop, login=("ana", "s3cret"))
    async with MaccorServer(sim) as server:
        with pytest.raises(InstrumentError, match="log in with \\(8, 1\\) first"):
            await MacNetBox.open(server.resource, name="box", bin_port=server.bin_port)
        with pytest.raises(InstrumentError, match="log in refused"):
            await MacNetBox.open(server.resource, name="box", bin_port=server.bin_port, login=("ana", "wrong"))
        box = await MacNetBox.open(server.resource, name="box", bin_port=server.bin_port, login=("ana", "s3cret"))
        try:
            ch = box.channel(0)
            await ch.source_current(-1e-3, voltage_limit=4.2)
            await ch.output(False)  # a rest goes by the binary port: it logs in there too
            assert sim.channels[0].reading[0] == 0.0 and sim.channels[0].mode == "R"
        finally:
            await box.close()
        # the binary (8, 1) as page 93 lays it out: lengths before the ASCII texts; a result byte, 1 passed
        reader, writer = await asyncio.open_connection("127.0.0.1", server.bin_port)
        for password, passed in ((b"nope", 0), (b"s3cret", 1)):
            payload = bytes([3]) + b"ana" + bytes([len(password)]) + password
            writer.write(struct.pack("<HHHH", 8, 1, 0, len(payload)) + payload)
            head = struct.unpack("<HHHH", await reader.readexactly(8))
            assert head == (8, 1, 0, 1) and (await reader.readexactly(1))[0] == passed
        # page 9: function class 0 is an echo
        message = struct.pack("<HHHH", 0, 0, 3, 4) + b"ping"
        writer.write(message)
        assert await reader.readexactly(len(message)) == message
        writer.close()


async def test_a_reply_printed_over_several_cr_lf_lines_is_read_whole() -> None:
    """The help prints every JSON reply indented over CR LF-ended lines (page 10); a box that sends it so, split
    across TCP segments, with the next reply's start in the same segment, is read one reply at a time."""
    replies: dict[tuple[int, int], dict[str, Any]] = {
        (1, 2): {"FClass": 1, "FNum": 2, "SystemID": "MACCOR 4300", "SystemType": 0, "TestChannels": 96},
        (1, 1): {"FClass": 1, "FNum": 1, "MacTest32EXEversionMajor": 1, "MacTest32EXEversionMinor": 5},
    }

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        texts = []
        for _ in range(2):
            request = json.loads(await reader.readuntil(b"\r\n"))
            key = (request["params"]["FClass"], request["params"]["FNum"])
            fields = [f'  "{k}":{json.dumps(v)}' for k, v in replies[key].items()]
            # the layout of the help's reply examples, line for line: CR LF ends every line
            texts.append("\r\n".join(["{", ' "jsonrpc":"2.0",', ' "result":', " {", ",\r\n".join(fields), " }",
                                       " ,", f' "id":{request["id"]}', "}"]) + "\r\n")
            if len(texts) == 1:  # the first reply in two pieces, the second piece not yet sent
                writer.write(texts[0][:20].encode())
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(texts[0][20:].encode())
            else:
                writer.write(texts[1].encode())
            await writer.drain()
        await reader.read()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        box = await MacNetBox.open(f"TCPIP::127.0.0.1::{port}::SOCKET", name="box", timeout=2.0)
        assert box.channels == 96
        assert "MacTest32 1.5" in await box.identify()
        await box.close()
    finally:
        server.close()
