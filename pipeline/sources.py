"""Reading landing files safely: gzip, zstd, sealed or plain, JSON lines, one JSON document or a
Parquet table, in bounded memory.

A landing file yields *records*: decoded JSON values with the place they came from (a line
number, or an item number inside a document). Whatever cannot become a record (an empty line,
invalid UTF-8, broken JSON, a line over the size limit, a corrupt gzip or zstd stream, a file that is not
JSON at all) yields a `Rejected` with the reason instead; nothing raises and nothing is skipped
without a trace.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import orjson
import zstandard

GZIP_MAGIC = b"\x1f\x8b"
# zstd frames, as the OpenTelemetry Collector's file exporter writes them with `compression: zstd`
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# what reading a damaged compressed stream raises: gzip's BadGzipFile is an OSError, a truncated
# gzip stream raises EOFError, zlib and zstd their own errors
CORRUPT_STREAM = (OSError, EOFError, zlib.error, zstandard.ZstdError)
# Apache Parquet files start (and end) with these bytes: LangSmith's bulk export, Langfuse's
# blob-storage export in Parquet
PARQUET_MAGIC = b"PAR1"
# How a Fernet token starts (version byte 0x80, then a timestamp's zero high bytes, in base64).
SEALED_MAGIC = b"gAAAAA"
# A single logged call is rarely above 1 MB (128k tokens of text is about 0.5 MB); 16 MB leaves
# room for inline images while keeping one line's memory bounded.
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
EXCERPT_CHARS = 160
_READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Record:
    line: int  # line number in a JSON-lines file, item number in a JSON document
    value: Any
    raw: bytes  # the record's bytes as logged (for excerpts); empty for document items


@dataclass(frozen=True)
class Rejected:
    line: int  # 0: the whole file
    reason: str
    excerpt: str = ""


def excerpt(raw: bytes) -> str:
    return raw[:EXCERPT_CHARS].decode("utf-8", errors="replace").rstrip()


class SealedFileError(OSError):
    """A sealed landing file that cannot be decrypted; the message says why and what to do."""


class UnreadableLandingFile(OSError):
    """A landing file the pipeline may not or cannot open. Not quarantined: the file is not
    malformed, and recording it as read would lose its calls for good; the run stops instead."""


def check_readable(path: Path) -> None:
    """Raise UnreadableLandingFile, naming the file and the fix, unless `path` opens for reading."""
    with open_raw(path) as f:
        f.read(1)


def open_raw(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as err:
        raise UnreadableLandingFile(
            err.errno, f"cannot read landing file {path} ({err.strerror or err}): give the pipeline's user read "
            "access to it (or move it out of the landing folder) and run again; nothing of this run was stored"
        ) from err


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, by content, not by name: decompressed on the fly when gzip or zstd, decrypted
    when sealed with the raw zone's key (slm-router writes its trace log sealed so)."""
    with open_raw(path) as f:
        head = f.read(len(SEALED_MAGIC))
    if head.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    if head.startswith(ZSTD_MAGIC):
        return io.BufferedReader(_ZstdFrames(open(path, "rb")))
    if head == SEALED_MAGIC:
        return io.BytesIO(_unsealed(path))  # sealed files are closed every 1,000 calls: small
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a file of zstd frames, one after another (the collector's file
    exporter compresses each write on its own), raising ZstdError where the file ends inside a
    frame: a truncated file is reported, not read as if it were whole."""

    def __init__(self, compressed: BinaryIO):
        self._compressed, self._frame = compressed, zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._offset, self._in_frame = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset >= len(self._pending):
            self._pending, self._offset = b"", 0
            chunk = self._compressed.read(_READ_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise zstandard.ZstdError("the file ends inside a zstd frame (truncated)")
                return 0
            decompressed = []
            while chunk:
                self._in_frame = True
                decompressed.append(self._frame.decompress(chunk))
                chunk = b""
                if self._frame.eof:  # a frame ended: the rest of the chunk starts the next one
                    chunk, self._frame, self._in_frame = self._frame.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
            self._pending = b"".join(decompressed)  # one copy, however many frames the chunk held
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = memoryview(self._pending)[self._offset:self._offset + size]
        self._offset += size
        return size

    def close(self) -> None:
        self._compressed.close()
        super().close()


def _unsealed(path: Path) -> bytes:
    from pipeline import rawzone

    stat = path.stat()
    try:
        return _decrypted(path, stat.st_mtime_ns, stat.st_size, os.environ.get(rawzone.ENCRYPTION_KEY_ENV) or None)
    except rawzone.RawZoneKeyError as err:
        raise SealedFileError(str(err)) from err


# Collection opens a file three times in a row (layout, format, records): a sealed one is
# decrypted once. Keyed by the file's modification time and size too, so a rewritten file is read
# afresh; a few files at most, each one trace log of up to 1,000 calls.
@functools.lru_cache(maxsize=4)
def _decrypted(path: Path, modified_ns: int, size: int, encryption_key: str | None) -> bytes:
    from pipeline import rawzone

    return rawzone.unseal(path, encryption_key)


def _read_line(stream: BinaryIO, max_bytes: int) -> tuple[bytes, bool]:
    """One line (without reading more than max_bytes of it into memory) and whether it was cut.

    A line over the limit is consumed up to its newline in chunks that are thrown away.
    """
    line = stream.readline(max_bytes + 1)
    if len(line) <= max_bytes or line.endswith(b"\n"):
        return line, False
    head = line[:EXCERPT_CHARS]
    while True:
        chunk = stream.readline(_READ_CHUNK)
        if not chunk or chunk.endswith(b"\n"):
            return head, True


def _decode(raw: bytes) -> Any:
    """Raise ValueError with a quarantine reason, or return the decoded JSON value."""
    if raw.strip() == b"":
        raise ValueError("empty line")
    try:
        return orjson.loads(raw)  # several times faster than json; most lines end here
    except orjson.JSONDecodeError:
        pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"invalid UTF-8 at byte {err.start}") from err
    try:
        return json.loads(text)  # also takes what orjson refuses: NaN, integers over 64 bits
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from err
    except RecursionError as err:  # orjson stops at 1,024 levels, json where Python's stack does
        raise ValueError("JSON nested too deeply to read") from err


def sniff_layout(path: Path) -> str:
    """"lines" (JSON lines, including a one-line document), "document" (one JSON value spread
    over several lines), "table" (a Parquet file, one record per row) or "not-json" (no line of
    the file's first 64 KB can start JSON)."""
    with open_raw(path) as f:
        head = f.read(64 * 1024)
        if head.startswith(PARQUET_MAGIC):
            f.seek(-len(PARQUET_MAGIC), os.SEEK_END)
            # Parquet ends with the magic too; without it a file is a cut Parquet file, unless
            # its lines are JSON (a log whose first line happens to start so: found by
            # tests/test_properties.py)
            if f.read() == PARQUET_MAGIC or not any(_is_json(line.strip()) for line in head.split(b"\n")):
                return "table"
    try:
        with open_binary(path) as stream:
            head = stream.read(64 * 1024)
    except (SealedFileError, UnreadableLandingFile):
        raise
    except CORRUPT_STREAM:
        return "not-json"
    lines = [line.strip() for line in head.split(b"\n")]
    json_lines = [line for line in lines if line[:1] in (b"{", b"[")]
    if not json_lines:
        return "not-json" if any(lines) else "lines"  # an empty file is zero lines
    first = json_lines[0]
    if first in (b"{", b"[") or (lines[0] == first and not first.endswith((b"}", b"]"))):
        # `{`, `[` or `{"resourceSpans": [` opens a multi-line document, unless most lines are
        # whole JSON values: then it is JSON lines whose first record is broken (found by
        # tests/test_properties.py); the last line of a full 64 KB head may be cut, so it is left out
        seen = [line for line in (lines[:-1] if len(head) == 64 * 1024 else lines) if line]
        whole = sum(1 for line in seen if line[:1] in (b"{", b"[") and _is_json(line))
        return "lines" if whole * 2 >= len(seen) else "document"
    return "lines"


def _is_json(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


def read_lines(path: Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Record | Rejected]:
    """Every line of a JSON-lines file (plain, gzip or zstd) as a Record or a Rejected."""
    line_number = 0
    try:
        with open_binary(path) as stream:
            while True:
                raw, cut = _read_line(stream, max_record_bytes)
                if not raw and not cut:
                    return
                line_number += 1
                if cut:
                    yield Rejected(line_number, f"line longer than {max_record_bytes} bytes", excerpt(raw))
                    continue
                try:
                    yield Record(line_number, _decode(raw), raw)
                except ValueError as err:
                    yield Rejected(line_number, str(err), excerpt(raw))
    except SealedFileError as err:
        yield Rejected(0, str(err))
    except UnreadableLandingFile:
        raise
    except CORRUPT_STREAM as err:
        yield Rejected(line_number + 1, f"compressed stream is corrupt or truncated ({err})")


def read_document(path: Path, item_paths: tuple[str, ...]) -> Iterator[Record | Rejected]:
    """The items of one JSON document, streamed with ijson so a large export never sits in memory.

    `item_paths` are ijson prefixes in order of preference (`"item"` for a top-level array,
    `"data.item"` for an API page, `"resourceSpans.item"` for OTLP); the first that yields items
    is used, and each item is wrapped back under its container key so adapters see one shape.
    """
    import ijson

    for prefix in item_paths:
        count = 0
        try:
            with open_binary(path) as stream:
                for count, item in enumerate(ijson.items(stream, prefix, use_float=True), start=1):
                    yield Record(count, _wrap(prefix, item), b"")
        except ijson.JSONError as err:
            yield Rejected(count + 1, f"invalid JSON document after item {count} ({err})")
            return
        except UnreadableLandingFile:
            raise
        except CORRUPT_STREAM as err:
            yield Rejected(count + 1, f"compressed stream is corrupt or truncated ({err})")
            return
        if count:
            return
    yield Rejected(0, f"JSON document holds no items at any of {', '.join(item_paths)}")


def read_table(path: Path, batch_rows: int = 1024) -> Iterator[Record | Rejected]:
    """Every row of a Parquet file as a Record of plain JSON values (times as ISO-8601 text), read
    a batch of rows at a time so that a large export never sits in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        with pq.ParquetFile(path) as table:
            for batch in table.iter_batches(batch_size=batch_rows):
                for values in batch.to_pylist():
                    row += 1
                    yield Record(row, _json_values(values), b"")
    except (pa.ArrowException, OSError) as err:
        yield Rejected(row + 1, f"Parquet file is corrupt or truncated ({err})")


def _json_values(value: Any) -> Any:
    """A Parquet row's values as JSON has them: times as ISO-8601 text, decimals as numbers."""
    if isinstance(value, dict):
        return {k: _json_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_values(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if type(value).__name__ == "Decimal":
        return float(value)
    return value


def _wrap(prefix: str, item: Any) -> Any:
    container = prefix.removesuffix(".item")
    return item if container == "item" else {container: [item]}


def first_records(path: Path, layout: str, item_paths: tuple[str, ...], limit: int = 20) -> list[Any]:
    """Up to `limit` decoded records from the start of a file, for format detection."""
    reader = {"lines": lambda: read_lines(path), "table": lambda: read_table(path)}.get(layout, lambda: read_document(path, item_paths))()
    found = []
    for position, item in enumerate(reader):
        if isinstance(item, Record):
            found.append(item.value)
        if len(found) >= limit or position >= 5 * limit:
            break
    return found
