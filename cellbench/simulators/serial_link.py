"""A null-modem cable in software: two pseudo-terminals whose bytes cross over.

Each end is a real serial device path that pyserial, pymodbus or VISA opens as it would a
USB-RS485 adapter, so a simulator that opens its own port (pymodbus's RTU server does) and a
driver can face each other over a serial line.
"""

from __future__ import annotations

import asyncio
import os
import tty


class NullModem:
    def __init__(self) -> None:
        self._fds: list[int] = []
        self.ends: tuple[str, str] = ("", "")

    async def open(self) -> NullModem:
        loop = asyncio.get_running_loop()
        masters, paths = [], []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)
            tty.setraw(master)
            os.set_blocking(master, False)
            masters.append(master)
            paths.append(os.ttyname(slave))
            self._fds += [master, slave]
        a, b = masters
        loop.add_reader(a, self._cross, a, b)
        loop.add_reader(b, self._cross, b, a)
        self._masters = (a, b)
        self.ends = (paths[0], paths[1])
        return self

    @staticmethod
    def _cross(src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
            os.write(dst, data)
        except (BlockingIOError, OSError):
            return

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for m in getattr(self, "_masters", ()):
            loop.remove_reader(m)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    async def __aenter__(self) -> NullModem:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
