"""The raw zone: traces as logged, before scrubbing. Encrypted at rest, owner-readable only.

Raw tables (the trace table and the quarantine, whose excerpts hold raw text) are written as
Parquet parts encrypted with Fernet (`cryptography`; AES in CBC mode with an HMAC-SHA256 tag)
under a key from the environment, to files of mode 0600:

    raw/traces/day=2026-10-01/part-<run>-00000.parquet.enc        calls, by call day
    raw/quarantine/ingested=2026-11-22/part-<run>-00001.parquet.enc
    raw/ledger.sqlite                                             ids and hashes, no content

Parts older than the retention period (counted from ingestion) are deleted. Fields that say who made a call are replaced
by keyed HMAC-SHA256 pseudonyms before anything is stored: calls of one session still group
together, but the stored data no longer names the session.

Key rotation: SLM_RAW_ENCRYPTION_KEY may hold several keys separated by commas, newest first.
New data is sealed with the first; data sealed with any of them stays readable (Fernet's
MultiFernet). `rotate` re-seals the stored parts under the first key, after which the old keys
can be dropped from the variable.

    python -m pipeline.rawzone new-keys          prints a fresh pair of keys as environment lines
    python -m pipeline.rawzone new-key           prints one fresh encryption key
    python -m pipeline.rawzone rotate OUTPUT_DIR re-seals the raw zone under the first key
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import os
import secrets
import shutil
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ledger import committed_runs
from pipeline.store import write_bytes

ENCRYPTION_KEY_ENV = "SLM_RAW_ENCRYPTION_KEY"
PSEUDONYM_KEY_ENV = "SLM_PSEUDONYM_KEY"
ENCRYPTED_SUFFIX = ".enc"
# The raw zone's tables: calls partitioned by call day, quarantined lines by ingestion day.
TRACES, QUARANTINE, STAGING = "traces", "quarantine", "_staging"
LEDGER = "ledger.sqlite"  # what was ingested, by which run (pipeline/ledger.py)


class RawZoneKeyError(RuntimeError):
    """A raw-zone key is missing or wrong; the message says which and what to do."""


def _fernet(keys: str):
    """The keys of SLM_RAW_ENCRYPTION_KEY: the first seals, any of them opens."""
    from cryptography.fernet import Fernet, MultiFernet

    fernets = []
    for position, key in enumerate(k.strip() for k in keys.split(",")):
        try:
            fernets.append(Fernet(key.encode()))
        except (ValueError, TypeError) as err:
            raise RawZoneKeyError(
                f"key {position + 1} of {ENCRYPTION_KEY_ENV} is not a Fernet key (32 url-safe base64-encoded bytes); "
                "make one with `python -m pipeline.rawzone new-key`"
            ) from err
    return MultiFernet(fernets)


def seal(payload: bytes, encryption_key: str | None) -> bytes:
    return _fernet(encryption_key).encrypt(payload) if encryption_key else payload


def unseal(path: Path, encryption_key: str | None) -> bytes:
    from cryptography.fernet import InvalidToken

    if path.suffix != ENCRYPTED_SUFFIX:
        return path.read_bytes()
    if not encryption_key:
        raise RawZoneKeyError(f"{path} is encrypted: set {ENCRYPTION_KEY_ENV} to the key it was written with")
    try:
        return _fernet(encryption_key).decrypt(path.read_bytes())
    except InvalidToken as err:
        raise RawZoneKeyError(
            f"{path} cannot be decrypted with the key(s) in {ENCRYPTION_KEY_ENV}: after a rotation keep the old "
            "key after the new one (comma-separated) until `python -m pipeline.rawzone rotate` has run"
        ) from err


def unsealed_chunks(stream, name: str, encryption_key: str | None, max_token_bytes: int):
    """The plaintext of a sealed file, one sealed chunk at a time: a sealed log is Fernet tokens,
    one per line (the router's trace log seals each call on its own; a file sealed whole is one
    token). Memory holds one token, so a token over `max_token_bytes` is refused, not read."""
    from cryptography.fernet import InvalidToken

    if not encryption_key:
        raise RawZoneKeyError(f"{name} is encrypted: set {ENCRYPTION_KEY_ENV} to the key it was written with")
    fernet = _fernet(encryption_key)
    while token := stream.readline(max_token_bytes + 1):
        if len(token) > max_token_bytes and not token.endswith(b"\n"):
            raise RawZoneKeyError(f"{name} holds a sealed chunk over {max_token_bytes} bytes: not read")
        if not token.strip():
            continue
        try:
            yield fernet.decrypt(token.strip())
        except InvalidToken as err:
            raise RawZoneKeyError(
                f"{name} cannot be decrypted with the key(s) in {ENCRYPTION_KEY_ENV}: after a rotation keep the old "
                "key after the new one (comma-separated) until `python -m pipeline.rawzone rotate` has run"
            ) from err


def write_part(path: Path, rows: list[dict], schema: pa.Schema, encryption_key: str | None) -> Path:
    """One Parquet part of a raw table, encrypted when a key is given; returns the file written."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    target = path.with_name(path.name + ".parquet" + (ENCRYPTED_SUFFIX if encryption_key else ""))
    write_bytes(target, seal(buffer.getvalue(), encryption_key))  # atomic, mode 0600
    return target


def read_part(path: Path, encryption_key: str | None) -> pa.Table:
    return pq.read_table(io.BytesIO(unseal(path, encryption_key)))


def part_files(root: Path, kind: str) -> list[Path]:
    """The published parts of one raw table (`traces` or `quarantine`), in partition order."""
    return sorted((root / kind).glob("*=*/part-*.parquet*"))


def part_run(part: Path) -> str:
    """The ingest run that wrote a part (`part-<run id>-<sequence>...`)."""
    return "-".join(part.name.split("-")[1:3])


def read_zone(root: Path, kind: str, schema: pa.Schema, encryption_key: str | None) -> pd.DataFrame:
    """Every published part of a raw table by a run the ledger committed, as one frame (empty,
    with its columns, if none). A part whose run the ledger never committed (an upload to object
    storage cut short can leave one) is not data; without a ledger every part is read."""
    committed = committed_runs(root / LEDGER)
    parts = [p for p in part_files(root, kind) if committed is None or part_run(p) in committed]
    tables = [read_part(p, encryption_key) for p in parts]
    if not tables:
        return schema.empty_table().to_pandas()
    # parts written before a column was added lack it: it reads as empty there
    frame = pa.concat_tables(tables, promote_options="default").to_pandas()
    return frame.reindex(columns=[*schema.names, *(c for c in frame.columns if c not in schema.names)])


def new_run_id(now: datetime) -> str:
    """Sortable by ingestion time, which retention reads back from part names."""
    return f"{now.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _run_time(part: Path) -> datetime | None:
    try:
        return datetime.strptime(part_run(part).split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except (IndexError, ValueError):
        return None


def _text_bytes(row: dict) -> int:
    """About what a row's text holds in memory (its characters)."""
    return sum(len(v) for v in row.values() if isinstance(v, str))


class RawZoneWriter:
    """Buffers one ingest run's rows per table and partition and writes them as parts.

    Parts go to a staging folder first; `publish` moves them into place only after the ledger
    has committed the run, so a crash never leaves rows stored that the ledger does not know (they
    would come back as duplicates) nor rows the ledger knows but that were never stored (lost).
    Memory stays bounded: a partition is written out every `rows_per_part` rows, and everything
    buffered is written once `max_buffered_rows` rows or `max_buffered_bytes` of their text are
    held (calls of a few MB each reach the second long before the first).
    """

    def __init__(self, root: Path, run_id: str, schemas: dict[str, pa.Schema], encryption_key: str | None,
                 rows_per_part: int = 5000, max_buffered_rows: int = 20000, max_buffered_bytes: int = 256 * 1024 * 1024):
        self.root, self.run_id, self.schemas, self.encryption_key = root, run_id, schemas, encryption_key
        self.staging = root / STAGING / run_id
        self.rows_per_part, self.max_buffered_rows, self.max_buffered_bytes = rows_per_part, max_buffered_rows, max_buffered_bytes
        self._buffers: dict[tuple[str, str], list[dict]] = {}
        self._buffered_bytes: dict[tuple[str, str], int] = {}  # each buffer's text (`_text_bytes`)
        self._sequence = 0
        self.parts_written = 0

    def add(self, kind: str, partition: str, row: dict) -> None:
        buffer = self._buffers.setdefault((kind, partition), [])
        buffer.append(row)
        self._buffered_bytes[kind, partition] = self._buffered_bytes.get((kind, partition), 0) + _text_bytes(row)
        if len(buffer) >= self.rows_per_part:
            self._write(kind, partition)
        elif (sum(len(b) for b in self._buffers.values()) >= self.max_buffered_rows
              or sum(self._buffered_bytes.values()) >= self.max_buffered_bytes):
            self.flush()

    def _write(self, kind: str, partition: str) -> None:
        rows = self._buffers.pop((kind, partition), [])
        self._buffered_bytes.pop((kind, partition), None)
        if rows:
            path = self.staging / kind / partition / f"part-{self.run_id}-{self._sequence:05d}"
            write_part(path, rows, self.schemas[kind], self.encryption_key)
            self._sequence += 1
            self.parts_written += 1

    def flush(self) -> None:
        for kind, partition in list(self._buffers):
            self._write(kind, partition)

    def discard(self) -> None:
        self._buffers.clear()
        self._buffered_bytes.clear()
        shutil.rmtree(self.staging, ignore_errors=True)


def publish(root: Path, run_id: str) -> int:
    """Move a committed run's staged parts into the raw zone; returns the number moved."""
    staging = root / STAGING / run_id
    moved = 0
    for part in sorted(staging.rglob("part-*")):
        target = root / part.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        moved += 1
    shutil.rmtree(staging, ignore_errors=True)
    return moved


def recover(root: Path, committed: set[str]) -> None:
    """Finish what an interrupted run left: publish committed runs' parts, drop the others'
    (staged, or published without their ledger commit by an upload cut short)."""
    for staging in sorted((root / STAGING).glob("*")) if (root / STAGING).is_dir() else []:
        if staging.name in committed:
            publish(root, staging.name)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    for part in [*part_files(root, TRACES), *part_files(root, QUARANTINE)]:
        if part_run(part) not in committed:
            part.unlink()


def expire(root: Path, retention_days: int, now: datetime) -> int:
    """Delete raw parts ingested more than `retention_days` ago; returns how many were deleted.

    The ledger keeps the ids and hashes (no content) of expired calls, so a log file still in the
    landing folder does not bring them back.
    """
    if retention_days <= 0:
        return 0
    cutoff = now - timedelta(days=retention_days)
    expired = 0
    for kind in (TRACES, QUARANTINE):
        for part in part_files(root, kind):
            written = _run_time(part)
            if written is not None and written < cutoff:
                part.unlink()
                expired += 1
        for folder in (root / kind).glob("*=*") if (root / kind).is_dir() else []:
            if not any(folder.iterdir()):
                folder.rmdir()
    return expired


def pseudonym(value, key: str) -> str | None:
    """A keyed pseudonym: equal inputs map to equal outputs; without the key nothing maps back."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return _keyed_digest(str(value), key)


@functools.lru_cache(maxsize=1 << 16)  # a session's calls come together: most lookups are hits
def _keyed_digest(value: str, key: str) -> str:
    digest = hmac.new(key.encode(), value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"anon-{digest[:20]}"



def rotate(root: Path, encryption_keys: str) -> int:
    """Re-seal every encrypted part of the raw zone under the first of `encryption_keys`;
    returns how many parts were re-sealed. Each part is replaced atomically, so a rotation that
    stops midway leaves every part readable with the same keys, and running it again finishes it."""
    from cryptography.fernet import InvalidToken

    fernet = _fernet(encryption_keys)
    rotated = 0
    for kind in (TRACES, QUARANTINE):
        for part in part_files(root, kind):
            if part.suffix != ENCRYPTED_SUFFIX:
                continue
            try:
                write_bytes(part, fernet.rotate(part.read_bytes()))
            except InvalidToken as err:
                raise RawZoneKeyError(f"{part} cannot be decrypted with any key in {ENCRYPTION_KEY_ENV}") from err
            rotated += 1
    return rotated


def new_encryption_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def new_keys() -> dict[str, str]:
    return {ENCRYPTION_KEY_ENV: new_encryption_key(), PSEUDONYM_KEY_ENV: secrets.token_urlsafe(32)}


USAGE = "usage: python -m pipeline.rawzone new-keys | new-key | rotate OUTPUT_DIR"


def main(argv: list[str]) -> int:
    if argv == ["new-keys"]:
        for name, value in new_keys().items():
            print(f"{name}={value}")
    elif argv == ["new-key"]:
        print(new_encryption_key())
    elif len(argv) == 2 and argv[0] == "rotate":
        keys = os.environ.get(ENCRYPTION_KEY_ENV, "")
        if not keys:
            sys.exit(f"rotate: set {ENCRYPTION_KEY_ENV} to the new key, then the old ones, comma-separated")
        raw = Path(argv[1]) / "raw"
        if not raw.is_dir():
            sys.exit(f"rotate: {raw} does not exist (give the pipeline's output folder, SLM_OUTPUT_DIR)")
        try:
            print(f"re-sealed {rotate(raw, keys)} raw parts under the first key of {ENCRYPTION_KEY_ENV}")
        except RawZoneKeyError as err:
            sys.exit(f"rotate: {err}")
    else:
        sys.exit(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
