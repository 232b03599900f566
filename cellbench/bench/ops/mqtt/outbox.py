"""The durable outbox: messages kept on disk, in sequence order, until the broker has them."""


from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)



# --- the outbox -----------------------------------------------------------------------------------------------
class Outbox:
    """Messages not yet acknowledged by the broker, in sequence order, on disk (bounded)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.limit = limit
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
                         "payload TEXT NOT NULL, qos INTEGER NOT NULL, telemetry INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS last (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER)")
        # how many wait, kept here: counting the table at every batch cost a full scan of a long outage's outbox
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM last").fetchone()
        return int(row[0]) if row else 0

    def turn(self, rows: list[tuple[int, str, str, int, int]], acked: int, n: int) -> list[tuple[int, str, str, int]]:
        """One pass of the publisher, in one transaction: forget what the broker has taken (sequence numbers up
        to `acked`), add what the run handed on, and return the first `n` messages still to send."""
        with self._db:
            self._db.execute("BEGIN")
            if acked:
                self._count -= self._db.execute("DELETE FROM outbox WHERE seq <= ?", (acked,)).rowcount
            if rows:
                self._add(rows)
            return self._db.execute("SELECT seq, topic, payload, qos FROM outbox ORDER BY seq LIMIT ?",
                                    (n,)).fetchall() if n else []

    def _add(self, rows: list[tuple[int, str, str, int, int]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?)", rows)
        self._db.execute("INSERT OR REPLACE INTO last VALUES (1, ?)", (rows[-1][0],))
        count = self._count + len(rows)
        if count > self.limit:  # (a replaced row would make that too many: counted exactly then)
            count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        over = count - self.limit
        if over > 0:  # the oldest telemetry goes first: events and the sequence stay
            count -= self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE "
                                      "telemetry = 1 ORDER BY seq LIMIT ?)", (over,)).rowcount
        self._count = count

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()


