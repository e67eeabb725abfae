"""The ingest ledger: which landing files, calls and quarantined lines were already taken in.

It makes collection idempotent across runs and in bounded memory: a file whose size and
modification time are unchanged is not read again, a call whose id and content hash are known
adds nothing, and a quarantined line is recorded once. It holds ids, hashes and counts, never
content, so it outlives the raw parts that retention deletes. SQLite (stdlib) keeps it on disk
with one transaction per run: a run that fails leaves the ledger as it was.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, fingerprint TEXT, format TEXT, run_id TEXT, calls INTEGER, quarantined INTEGER);
CREATE TABLE IF NOT EXISTS calls (trace_id TEXT PRIMARY KEY, record_hash TEXT, day TEXT, run_id TEXT);
CREATE TABLE IF NOT EXISTS quarantine (
    source_file TEXT, source_line INTEGER, reason TEXT, run_id TEXT, PRIMARY KEY (source_file, source_line, reason));
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, committed_at TEXT);
"""

NEW, REPEATED, CONFLICT = "new", "repeated", "conflict"


def committed_runs(path: Path) -> set[str] | None:
    """The runs a ledger file has committed, read without writing to it; None without a ledger."""
    if not Path(path).exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {run for (run,) in db.execute("SELECT run_id FROM runs")}
    finally:
        db.close()


class Ledger:
    def __init__(self, path: Path | str = ":memory:"):
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch(mode=0o600, exist_ok=True)
        # autocommit off by hand: one explicit transaction per run
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.executescript(SCHEMA)
        self._db.execute("BEGIN")

    def committed_runs(self) -> set[str]:
        return {run for (run,) in self._db.execute("SELECT run_id FROM runs")}

    def file_unchanged(self, path: Path, fingerprint: str) -> bool:
        found = self._db.execute("SELECT fingerprint FROM files WHERE path = ?", (str(path),)).fetchone()
        return found is not None and found[0] == fingerprint

    def record_file(self, path: Path, fingerprint: str, file_format: str, run_id: str, calls: int, quarantined: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
            (str(path), fingerprint, file_format, run_id, calls, quarantined),
        )

    def admit_call(self, trace_id: str, record_hash: str, day: str, run_id: str) -> str:
        """NEW (and recorded), REPEATED (same id, same content) or CONFLICT (same id, other content)."""
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?)", (trace_id, record_hash, day, run_id)
        ).rowcount
        if inserted:
            return NEW
        (known,) = self._db.execute("SELECT record_hash FROM calls WHERE trace_id = ?", (trace_id,)).fetchone()
        return REPEATED if known == record_hash else CONFLICT

    def admit_quarantine(self, source_file: str, source_line: int, reason: str, run_id: str) -> bool:
        """True when this line with this reason was not quarantined before."""
        return bool(
            self._db.execute(
                "INSERT OR IGNORE INTO quarantine VALUES (?, ?, ?, ?)", (source_file, source_line, reason, run_id)
            ).rowcount
        )

    def calls_by_day(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT day, COUNT(*) FROM calls GROUP BY day ORDER BY day").fetchall())

    def commit(self, run_id: str, now: datetime) -> None:
        self._db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?)", (run_id, now.isoformat()))
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def rollback(self) -> None:
        if self._db.in_transaction:  # SQLite has rolled back already after some errors (a full disk)
            self._db.execute("ROLLBACK")
        self._db.execute("BEGIN")

    def close(self) -> None:
        self._db.close()
