"""Reading landing files safely: gzip, zstd, sealed or plain, JSON lines, one JSON document or a
Parquet table, in bounded memory.

A landing file yields *records*: decoded JSON values with the place they came from (a line
number, or an item number inside a document). Whatever cannot become a record (an empty line,
invalid UTF-8, broken JSON, a line over the size limit, a corrupt gzip or zstd stream, a file that is not
JSON at all) yields a `Rejected` with the reason instead; nothing raises and nothing is skipped
without a trace.
"""

from __future__ import annotations

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
# A sealed chunk holds one call of the router's trace log (its requests are at most 4 MiB; a
# Fernet token is 4/3 of its plaintext). Files that older routers sealed whole are one chunk each:
# up to this size they are read as before.
MAX_SEALED_CHUNK_BYTES = 64 * 1024 * 1024
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
        return io.BufferedReader(_Unsealed(path))
    return open(path, "rb")


class _Chunks(io.RawIOBase):
    """A readable stream over `_next_chunk`, which returns the next piece of the content (b"" at
    its end): what it holds in memory is one piece."""

    def __init__(self, source: BinaryIO):
        self._source, self._pending, self._offset = source, b"", 0

    def _next_chunk(self) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset >= len(self._pending):
            self._pending, self._offset = self._next_chunk(), 0
            if not self._pending:
                return 0
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = memoryview(self._pending)[self._offset:self._offset + size]
        self._offset += size
        return size

    def close(self) -> None:
        self._source.close()
        super().close()


class _ZstdFrames(_Chunks):
    """The decompressed bytes of a file of zstd frames, one after another (the collector's file
    exporter compresses each write on its own), raising ZstdError where the file ends inside a
    frame: a truncated file is reported, not read as if it were whole."""

    def __init__(self, compressed: BinaryIO):
        super().__init__(compressed)
        self._frame, self._in_frame = zstandard.ZstdDecompressor().decompressobj(), False

    def _next_chunk(self) -> bytes:
        while True:
            chunk = self._source.read(_READ_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise zstandard.ZstdError("the file ends inside a zstd frame (truncated)")
                return b""
            decompressed = []
            while chunk:
                self._in_frame = True
                decompressed.append(self._frame.decompress(chunk))
                chunk = b""
                if self._frame.eof:  # a frame ended: the rest of the chunk starts the next one
                    chunk, self._frame, self._in_frame = self._frame.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
            if joined := b"".join(decompressed):  # one copy, however many frames the chunk held
                return joined


class _Unsealed(_Chunks):
    """The plaintext of a file sealed with the raw zone's key, decrypted one sealed chunk at a
    time (`rawzone.unsealed_chunks`): memory holds one chunk, not the file. A missing or wrong key
    raises SealedFileError, whose message says what to set."""

    def __init__(self, path: Path):
        from pipeline import rawzone

        super().__init__(open(path, "rb"))
        self._chunks = rawzone.unsealed_chunks(self._source, str(path), os.environ.get(rawzone.ENCRYPTION_KEY_ENV) or None,
                                               MAX_SEALED_CHUNK_BYTES)

    def _next_chunk(self) -> bytes:
        from pipeline import rawzone

        try:
            return next((chunk for chunk in self._chunks if chunk), b"")
        except rawzone.RawZoneKeyError as err:
            raise SealedFileError(str(err)) from err


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
    head, cut = _readable_head(path, 64 * 1024)
    if cut and not head:
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


def _readable_head(path: Path, size: int) -> tuple[bytes, bool]:
    """Up to `size` bytes from the start of a file's content, and whether its compressed stream
    broke before: a cut gzip or zstd file is judged by the lines it still has (they are kept)."""
    head = bytearray()
    try:
        with open_binary(path) as stream:
            while len(head) < size and (chunk := stream.read(min(4096, size - len(head)))):
                head += chunk
    except SealedFileError:
        if not head:  # no key, or the wrong one: the whole file says so
            raise
        return bytes(head), True  # a damaged token after good ones: like a cut stream
    except UnreadableLandingFile:
        raise
    except CORRUPT_STREAM:
        return bytes(head), True
    return bytes(head), False


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
        yield Rejected(line_number + 1 if line_number else 0, str(err))  # 0: the whole file
    except UnreadableLandingFile:
        raise
    except CORRUPT_STREAM as err:
        yield Rejected(line_number + 1, f"compressed stream is corrupt or truncated ({err})")


class _ItemTooLarge(Exception):
    pass


class _ItemBudget(_Chunks):
    """A stream that refuses to give more than `limit` bytes between two calls of `reset`. The
    JSON parser holds a whole value (a string, and an item being built) before it passes it on:
    resetting at each event between items, and at the start of each item, bounds what it holds
    as a line's size is bounded."""

    def __init__(self, stream: BinaryIO, limit: int):
        super().__init__(stream)
        self._limit, self._since_reset = limit, 0

    def reset(self) -> None:
        self._since_reset = 0

    def _next_chunk(self) -> bytes:
        data = self._source.read(64 * 1024)
        self._since_reset += len(data)
        if self._since_reset > self._limit + 64 * 1024:  # the parser reads ahead by a buffer
            raise _ItemTooLarge()
        return data


def _document_items(budget: _ItemBudget, prefix: str) -> Iterator[Any]:
    """ijson's `items`, built from its events here so that `budget` counts each item's bytes."""
    import ijson
    from ijson.common import ObjectBuilder

    events = ijson.parse(budget, use_float=True)
    for current, event, value in events:
        budget.reset()
        if current != prefix:
            continue
        if event not in ("start_map", "start_array"):
            yield value
            continue
        builder, depth = ObjectBuilder(), 1
        builder.event(event, value)
        while depth:
            current, event, value = next(events)
            builder.event(event, value)
            depth += event in ("start_map", "start_array")
            depth -= event in ("end_map", "end_array")
        yield builder.value


def read_document(path: Path, item_paths: tuple[str, ...], max_item_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Record | Rejected]:
    """The items of one JSON document, streamed with ijson so a large export never sits in memory.

    `item_paths` are ijson prefixes in order of preference (`"item"` for a top-level array,
    `"data.item"` for an API page, `"resourceSpans.item"` for OTLP); the first that yields items
    is used, and each item is wrapped back under its container key so adapters see one shape.
    An item (or any value) over `max_item_bytes` stops the file where it starts, with its reason:
    it is never held whole, and a document cannot be resumed after it.
    """
    import ijson

    too_large = None
    for prefix in item_paths:
        count = 0
        try:
            with open_binary(path) as stream:
                for count, item in enumerate(_document_items(_ItemBudget(stream, max_item_bytes), prefix), start=1):
                    yield Record(count, _wrap(prefix, item), b"")
        except _ItemTooLarge:
            too_large = Rejected(count + 1, f"document item {count + 1} (or a value in it) is longer than {max_item_bytes} "
                                            "bytes; the rest of the document is not read")
            if not count:  # met before any item at this prefix: perhaps in an item at another one
                continue
            yield too_large
            return
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
    yield too_large or Rejected(0, f"JSON document holds no items at any of {', '.join(item_paths)}")


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
