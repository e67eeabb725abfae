"""Step 1, collection: an agent's LLM-call logs, in whatever format they were written, into one
canonical trace table, streamed in bounded memory.

Every piece of input ends up somewhere: a well-formed call becomes a row of the trace table, a
piece that is not an LLM call (a tool span, a batch embedding request) is counted, and anything
else becomes a row of the quarantine table with its file, line number and reason. Nothing is
dropped silently and no line can stop the run.

    find_landing_files -> plan (detect each file's format) -> ingest (stream, dedup, write)

`ingest` writes through a sink: the raw zone's writer in the pipeline (encrypted parts by call
day), or `MemorySink` for `read_calls`, which returns the tables as frames for small inputs and
tests.
"""

from __future__ import annotations

import fnmatch
import functools
import errno
import hashlib
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import pyarrow as pa

from pipeline import failpoints, rawzone, sources
from pipeline.calls import json_problem
from pipeline.formats import json_text, registry
from pipeline.formats.openai_batch import BatchRequests, input_file_for
from pipeline.ledger import CONFLICT, NEW, REPEATED, Ledger
from pipeline.store import DiskFullError, disk_full_message

# One canonical schema for every source. Messages, tools and the response message stay JSON
# text: their shapes vary between agents (content parts, tool calls), and JSON keeps them exact.
TRACE_SCHEMA = pa.schema(
    [
        ("trace_id", pa.string()),
        ("called_at", pa.timestamp("us", tz="UTC")),
        ("agent", pa.string()),
        ("step_tag", pa.string()),  # the agent's own name for the step, where its logs carry one
        ("session_id", pa.string()),
        ("origin", pa.string()),  # JSON: the configured origin fields, pseudonymized
        ("model", pa.string()),  # the model the agent asked for
        ("answered_by", pa.string()),  # the model that wrote the answer, where the log says (response model, router headers)
        ("messages", pa.string()),
        ("tools", pa.string()),
        ("response_message", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("latency_ms", pa.float64()),
        ("feedback", pa.string()),
        ("source_format", pa.string()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("record_hash", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_line", pa.int64()),  # 0: the whole file
        ("reason", pa.string()),
        ("excerpt", pa.string()),
    ]
)

# Fields that say who made a call, under the names the supported formats use. Matched without
# regard to case; any other metadata field is not stored at all.
DEFAULT_ORIGIN_FIELDS = (
    "session_id", "sessionId", "session.id", "gen_ai.conversation.id", "conversation_id", "thread_id",
    "user", "user_id", "userId", "user.id", "enduser.id",
    "client_id", "client.id", "client.address", "client_ip", "ip", "ip_address", "source.address",
    "tenant_id", "tenantId", "tenant.id", "org_id", "organization_id",
)
# Fields in which an agent's own instrumentation names the step a call belongs to (matched without
# regard to case). Clustering uses the tag where there is one and reports where it disagrees with
# the embeddings.
DEFAULT_STEP_TAG_FIELDS = ("step_type", "step_name", "step", "task_type", "task_name")
# The first of these that a call has becomes its session_id: the field that groups its calls.
SESSION_FIELDS = ("session_id", "sessionid", "session.id", "gen_ai.conversation.id", "conversation_id", "thread_id")


@dataclass(frozen=True)
class IngestOptions:
    formats: dict[str, str] = field(default_factory=dict)  # file glob -> format name; others auto
    origin_fields: tuple[str, ...] = DEFAULT_ORIGIN_FIELDS
    step_tag_fields: tuple[str, ...] = DEFAULT_STEP_TAG_FIELDS
    pseudonym_key: str | None = None  # None keeps origin values as logged
    max_record_bytes: int = sources.DEFAULT_MAX_RECORD_BYTES

    @functools.cached_property
    def wanted_origin_fields(self) -> frozenset[str]:
        return frozenset(name.lower() for name in self.origin_fields)


@dataclass
class LandingFile:
    path: Path
    layout: str  # "lines", "document" or "table" (see sources.sniff_layout)
    format: str | None  # None: the file cannot be read, `problem` says why
    problem: str = ""
    batch_input: Path | None = None  # for openai_batch output files

    def fingerprint(self) -> str:
        """Size and modification time, as make and rsync judge change; a batch output file also
        changes when its input file does."""
        stat = self.path.stat()
        own = f"{stat.st_size}:{stat.st_mtime_ns}:{self.format}"
        return own + (f"|{LandingFile(self.batch_input, 'lines', None).fingerprint()}" if self.batch_input else "")


@dataclass
class IngestStats:
    files_read: int = 0
    files_unchanged: int = 0  # already ingested, size and time unchanged: not read again
    batch_input_files: int = 0  # read through their output files
    formats: Counter = field(default_factory=Counter)  # files read per format
    calls: int = 0  # new calls stored
    repeated: int = 0  # calls identical to one already ingested (a file landed twice, say)
    quarantined: int = 0
    skipped: Counter = field(default_factory=Counter)  # pieces that are not LLM calls, by kind
    reasons: Counter = field(default_factory=Counter)  # quarantine reasons, by kind
    calls_by_day: Counter = field(default_factory=Counter)  # new calls per call day

    @property
    def pieces(self) -> int:
        return self.calls + self.repeated + self.quarantined + sum(self.skipped.values())

    @property
    def quarantined_share(self) -> float:
        return self.quarantined / max(self.calls + self.repeated + self.quarantined, 1)

    def as_dict(self) -> dict:
        return {
            "files_read": self.files_read,
            "files_unchanged": self.files_unchanged,
            "batch_input_files": self.batch_input_files,
            "formats": dict(self.formats),
            "calls": self.calls,
            "repeated_records": self.repeated,
            "quarantined": self.quarantined,
            "quarantined_share": round(self.quarantined_share, 4),
            "skipped_not_llm_calls": dict(self.skipped),
            "quarantine_reasons": dict(self.reasons),
            "calls_by_day": dict(sorted(self.calls_by_day.items())),
        }


def find_landing_files(landing_dir: Path) -> list[Path]:
    """Every file of a landing folder (hidden files aside), by name, with a clear error if none.

    All files are taken, whatever their extension: one that is not a log is quarantined with
    its reason rather than passed over in silence.
    """
    landing_dir = Path(landing_dir)
    if not landing_dir.is_dir():
        raise FileNotFoundError(
            f"Landing folder {landing_dir} does not exist. Point SLM_LANDING_DIR at the folder "
            "that holds your agent's LLM-call logs."
        )
    files = sorted(
        p for p in landing_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(landing_dir).parts)
    )
    if not files:
        raise FileNotFoundError(
            f"Landing folder {landing_dir} holds no files. Land your agent's LLM-call logs there "
            "(OpenAI request/response JSON lines, OpenAI Batch files, OTLP/JSON GenAI spans, "
            "Langfuse exports or canonical JSON lines; see docs/formats.md)."
        )
    return files


def leaves_folder(path: Path, landing_dir: Path) -> bool:
    """Whether a landing file is a symbolic link (or lies under one) to a file outside the landing
    folder: such a file is refused, never read, so that a link cannot make collection store any
    file the pipeline's user may read."""
    return not Path(path).resolve().is_relative_to(Path(landing_dir).resolve())


OUTSIDE_LANDING = "symbolic link to a file outside the landing folder: refused, not read"


def readable_landing_files(landing_dir: Path) -> list[Path]:
    """The landing folder's files, each checked to open: one the pipeline may not read stops a
    run before it starts (collection itself stops at it too, before anything is stored). Links
    that leave the folder are not opened (collection refuses them)."""
    files = find_landing_files(landing_dir)
    for path in files:
        if not leaves_folder(path, landing_dir):
            sources.check_readable(path)
    return files


def landing_fingerprints(landing_dir: Path) -> dict[str, str]:
    """Each landing file's size and modification time: what a sensor compares to see new files."""
    return {str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in find_landing_files(landing_dir)}


def _configured_format(path: Path, formats: dict[str, str]) -> str | None:
    for pattern, name in formats.items():
        if fnmatch.fnmatch(path.name, pattern) or fnmatch.fnmatch(str(path), pattern):
            if name not in registry.ADAPTERS and name not in registry.COMPANION_FORMATS:
                known = ", ".join([*registry.ADAPTERS, *registry.COMPANION_FORMATS])
                raise ValueError(f"format {name!r} (for {pattern!r}) is not one of: {known}")
            return name
    return None


def plan(files: Iterable[Path], options: IngestOptions = IngestOptions(), landing_dir: Path | None = None) -> list[LandingFile]:
    """Each file's layout and format (detected, or as configured), batch outputs paired with
    inputs; with `landing_dir`, a link that leaves it is refused (`leaves_folder`)."""
    planned = []
    for path in map(Path, files):
        if landing_dir is not None and leaves_folder(path, landing_dir):
            planned.append(LandingFile(path, "not-json", None, OUTSIDE_LANDING))
            continue
        layout, detected, problem = registry.detect_file(path)
        configured = _configured_format(path, options.formats)
        if configured and layout != "not-json":
            detected, problem = configured, ""
        if layout == "lines" and detected is None and path.stat().st_size == 0:
            problem = ""  # an empty file holds no calls and nothing wrong
        planned.append(LandingFile(path, layout, detected, problem))
    inputs = [f.path for f in planned if f.format == registry.openai_batch.INPUT_NAME]
    for landing_file in planned:
        if landing_file.format == registry.openai_batch.NAME:
            landing_file.batch_input = input_file_for(landing_file.path, inputs)
    return planned


def record_hash(record: Any) -> str:
    """A stable hash of a logged record's content, whatever its key order or whitespace."""
    return hashlib.sha256(json_text(record, sort_keys=True).encode("utf-8")).hexdigest()


def step_tag(context: dict[str, Any], options: IngestOptions) -> str | None:
    """The call's step as the agent named it: the first configured step-tag field it has."""
    by_name = {k.lower(): v for k, v in context.items()}
    return next((str(by_name[f.lower()]) for f in options.step_tag_fields if f.lower() in by_name), None)


def origin_columns(context: dict[str, Any], options: IngestOptions) -> tuple[str | None, str | None]:
    """(session_id, origin JSON) from a call's metadata: only the configured origin fields, each
    replaced by its keyed pseudonym when a key is given."""
    origin = {k: v for k, v in context.items() if k.lower() in options.wanted_origin_fields}
    if options.pseudonym_key:
        origin = {k: rawzone.pseudonym(v, options.pseudonym_key) for k, v in origin.items()}
    session = next((origin[k] for k in origin if k.lower() in SESSION_FIELDS), None)
    return (str(session) if session is not None else None), (json_text(origin, sort_keys=True) if origin else None)


class MemorySink:
    """Keeps what an ingest run admits in lists (for `read_calls`)."""

    def __init__(self):
        self.rows: dict[str, list[dict]] = {rawzone.TRACES: [], rawzone.QUARANTINE: []}

    def add(self, kind: str, partition: str, row: dict) -> None:
        self.rows[kind].append(row)


class _Run:
    """One ingest run's bookkeeping: the ledger decides, the sink stores, the stats count."""

    def __init__(self, sink, ledger: Ledger, options: IngestOptions, run_id: str, now: datetime):
        self.sink, self.ledger, self.options, self.run_id, self.now = sink, ledger, options, run_id, now
        self.stats = IngestStats()

    def quarantine(self, source_file: str, line: int, reason: str, excerpt: str = "") -> None:
        if not self.ledger.admit_quarantine(source_file, line, reason, self.run_id):
            return
        self.stats.quarantined += 1
        self.stats.reasons[_reason_kind(reason)] += 1
        self.sink.add(
            rawzone.QUARANTINE,
            f"ingested={self.now:%Y-%m-%d}",
            {"source_file": source_file, "source_line": line, "reason": reason, "excerpt": excerpt},
        )

    def call(self, row: dict, piece_hash: str, landing_file: LandingFile, line: int, raw: bytes) -> None:
        context = row.pop("context")  # the row is this call's own, fresh from its adapter
        row["record_hash"] = piece_hash
        day = f"{row['called_at']:%Y-%m-%d}"
        verdict = self.ledger.admit_call(row["trace_id"], row["record_hash"], day, self.run_id)
        if verdict == REPEATED:
            self.stats.repeated += 1
            return
        if verdict == CONFLICT:
            reason = f"trace id {row['trace_id']} already ingested with different content"
            self.quarantine(str(landing_file.path), line, reason, sources.excerpt(raw))
            return
        assert verdict == NEW
        row["session_id"], row["origin"] = origin_columns(context, self.options)
        row["step_tag"] = step_tag(context, self.options)
        row.update(
            source_format=landing_file.format, source_file=str(landing_file.path), source_line=line, ingested_at=self.now
        )
        self.stats.calls += 1
        self.stats.calls_by_day[day] += 1
        self.sink.add(rawzone.TRACES, f"day={day}", row)


def _error_text(err: Exception) -> str:
    """An unexpected error as a quarantine reason: its kind and the start of its message."""
    return f"{type(err).__name__}: {str(err)[:200]}"


def _reason_kind(reason: str) -> str:
    """A reason without its details, for counts ("invalid JSON (...)" -> "invalid JSON")."""
    if reason.startswith(("span ", "observation ", "run ", "log records of span ")) and ": " in reason:
        reason = reason.split(": ", 1)[1]  # which span, observation or run
    if reason.startswith("trace id ") and reason.endswith("already ingested with different content"):
        return "trace id already ingested with different content"
    for cut in (" (", " at byte ", ": "):
        reason = reason.split(cut)[0]
    return reason


def _records(landing_file: LandingFile, options: IngestOptions):
    if landing_file.layout == "document":
        return sources.read_document(landing_file.path, registry.ADAPTERS[landing_file.format].ITEM_PATHS,
                                     options.max_record_bytes)
    if landing_file.layout == "table":
        return sources.read_table(landing_file.path)
    return sources.read_lines(landing_file.path, options.max_record_bytes)


@dataclass
class _FileContext:
    batch_requests: BatchRequests | None = None


def _ingest_file(run: _Run, landing_file: LandingFile, workdir: Path) -> None:
    name = str(landing_file.path)
    adapter = registry.ADAPTERS[landing_file.format]
    context = _FileContext()
    if landing_file.format == registry.openai_batch.NAME:
        context.batch_requests = BatchRequests(landing_file.batch_input, workdir / f"batch-{run.stats.files_read}.sqlite")
    records = _records(landing_file, run.options)
    try:
        while True:
            try:
                item = next(records)
            except StopIteration:
                break
            except Exception as err:  # a reader's bug must not stop the run: what it read is kept
                run.quarantine(name, 0, f"file could not be read further ({_error_text(err)})")
                break
            if isinstance(item, sources.Rejected):
                run.quarantine(name, item.line, item.reason, item.excerpt)
                continue
            problem = json_problem(item.value)  # before any adapter walks it
            try:
                outcomes = [] if problem else list(adapter.outcomes(item.value, context))
                hashes = [record_hash(o.piece) if o.row else None for o in outcomes]
            except Exception as err:  # a shape no check foresaw, or an adapter's bug: this record only
                problem = f"record could not be read ({_error_text(err)})"
            if problem:
                run.quarantine(name, item.line, problem, sources.excerpt(item.raw))
                continue
            for outcome, piece_hash in zip(outcomes, hashes):
                if outcome.skipped:
                    run.stats.skipped[outcome.skipped] += 1
                elif outcome.error:
                    reason = f"{outcome.where}: {outcome.error}" if outcome.where else outcome.error
                    run.quarantine(name, item.line, reason, sources.excerpt(item.raw))
                else:
                    run.call(outcome.row, piece_hash, landing_file, item.line, item.raw)
    finally:
        records.close()
        if context.batch_requests is not None:
            context.batch_requests.close()


def ingest(
    planned: list[LandingFile],
    sink,
    ledger: Ledger,
    options: IngestOptions = IngestOptions(),
    run_id: str = "memory",
    now: datetime | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> IngestStats:
    """Stream every planned file through its adapter into the sink; the ledger makes it idempotent.

    A call identical to one already ingested (in this run or an earlier one) adds nothing and
    is only counted. A trace id that comes back with different content keeps its first row; the
    later ones are quarantined with the reason, so the trace id stays a key. The caller commits
    or rolls back the ledger.
    """
    now = now or datetime.now(timezone.utc)
    run = _Run(sink, ledger, options, run_id, now)
    with tempfile.TemporaryDirectory(prefix="slm-convert-") as scratch:  # batch-join indexes
        _ingest_planned(run, planned, Path(scratch), progress)
    return run.stats


def _ingest_planned(run: _Run, planned: list[LandingFile], workdir: Path, progress: Callable[[str], None]) -> None:
    ledger, run_id = run.ledger, run.run_id
    for landing_file in planned:
        if landing_file.format == registry.openai_batch.INPUT_NAME:
            run.stats.batch_input_files += 1
            continue
        fingerprint = landing_file.fingerprint()
        if ledger.file_unchanged(landing_file.path, fingerprint):
            run.stats.files_unchanged += 1
            continue
        before = (run.stats.calls, run.stats.quarantined)
        if landing_file.format is None:
            if landing_file.problem:
                run.quarantine(str(landing_file.path), 0, landing_file.problem)
        else:
            _ingest_file(run, landing_file, workdir)
        kind = landing_file.format or ("unreadable" if landing_file.problem else "empty")
        run.stats.files_read += 1
        run.stats.formats[kind] += 1
        calls, quarantined = run.stats.calls - before[0], run.stats.quarantined - before[1]
        ledger.record_file(landing_file.path, fingerprint, landing_file.format or "", run_id, calls, quarantined)
        progress(f"{landing_file.path.name} ({kind}): {calls} new calls, {quarantined} quarantined")


@dataclass
class IngestResult:
    traces: pd.DataFrame
    quarantine: pd.DataFrame
    stats: IngestStats

    @property
    def repeated(self) -> int:
        return self.stats.repeated


def read_calls(files: Iterable[Path], options: IngestOptions = IngestOptions(), now: datetime | None = None) -> IngestResult:
    """Ingest files into memory, without a raw zone (small inputs, tests, notebooks)."""
    sink, ledger = MemorySink(), Ledger(":memory:")
    stats = ingest(plan(files, options), sink, ledger, options, now=now)
    ledger.close()
    traces = pd.DataFrame(sink.rows[rawzone.TRACES], columns=TRACE_SCHEMA.names)
    traces = traces.sort_values(["called_at", "trace_id"], kind="stable").reset_index(drop=True)
    quarantine = pd.DataFrame(sink.rows[rawzone.QUARANTINE], columns=QUARANTINE_SCHEMA.names)
    return IngestResult(traces=traces, quarantine=quarantine, stats=stats)


def quarantine_reasons(quarantine: pd.DataFrame) -> dict[str, int]:
    """Counts of quarantined lines by kind of reason (the reason up to its first detail)."""
    return dict(Counter(_reason_kind(r) for r in quarantine["reason"]))


@dataclass
class CollectResult:
    run_id: str
    stats: IngestStats
    expired_parts: int  # raw parts deleted by retention in this run
    days_stored: dict[str, int]  # every call day the ledger knows, with its call count


def collect(
    landing_dir: Path,
    raw_root: Path,
    options: IngestOptions,
    encryption_key: str | None,
    retention_days: int,
    now: datetime | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> CollectResult:
    """One collection run: new landing files into the raw zone, then retention.

    The ledger commits before the staged parts are published, and a later run finishes any
    publish that a crash interrupted, so a call is stored exactly once or the run did not happen.
    """
    now = now or datetime.now(timezone.utc)
    planned = plan(find_landing_files(landing_dir), options, landing_dir)
    raw_root.mkdir(parents=True, exist_ok=True)
    raw_root.chmod(0o700)  # the raw zone's folder, like its files, is its owner's only
    ledger = Ledger(raw_root / rawzone.LEDGER)
    try:
        rawzone.recover(raw_root, ledger.committed_runs())
        run_id = rawzone.new_run_id(now)
        schemas = {rawzone.TRACES: TRACE_SCHEMA, rawzone.QUARANTINE: QUARANTINE_SCHEMA}
        writer = rawzone.RawZoneWriter(raw_root, run_id, schemas, encryption_key)
        try:
            stats = ingest(planned, writer, ledger, options, run_id, now, progress)
            writer.flush()
            ledger.commit(run_id, now)
            failpoints.reached("raw_traces:committed")  # the next run publishes what this one staged
        except BaseException as err:
            ledger.rollback()
            writer.discard()
            if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise DiskFullError(errno.ENOSPC, disk_full_message(raw_root / rawzone.LEDGER)) from err
            raise
        rawzone.publish(raw_root, run_id)
        expired = rawzone.expire(raw_root, retention_days, now)
        return CollectResult(run_id, stats, expired, ledger.calls_by_day())
    finally:
        ledger.close()


def stored_traces(raw_root: Path, encryption_key: str | None) -> pd.DataFrame:
    """Every call kept in the raw zone by a committed run, in call order."""
    traces = rawzone.read_zone(raw_root, rawzone.TRACES, TRACE_SCHEMA, encryption_key)
    return traces.sort_values(["called_at", "trace_id"], kind="stable").reset_index(drop=True)


def stored_quarantine(raw_root: Path, encryption_key: str | None) -> pd.DataFrame:
    return rawzone.read_zone(raw_root, rawzone.QUARANTINE, QUARANTINE_SCHEMA, encryption_key)
