"""Step 1, collection: read an agent's JSONL call logs into one canonical trace table.

The input is what an OpenAI-compatible logging proxy writes, one call per line:
`{"id", "created_at", "request": {"model", "messages", "tools"?}, "response": {"choices": [...],
"usage"}, "latency_ms", "metadata": {"agent", "session_id", "feedback"}}`.

Every line ends up somewhere: a well-formed call becomes a row of the trace table, anything else
becomes a row of the quarantine table with its file, line number and the reason. Nothing is
dropped silently and no line can stop the run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa

# One canonical schema for every source. Messages, tools and the response message stay JSON
# text: their shapes vary between agents (content parts, tool calls), and JSON keeps them exact.
TRACE_SCHEMA = pa.schema(
    [
        ("trace_id", pa.string()),
        ("called_at", pa.timestamp("us", tz="UTC")),
        ("agent", pa.string()),
        ("session_id", pa.string()),
        ("model", pa.string()),
        ("messages", pa.string()),
        ("tools", pa.string()),
        ("response_message", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("latency_ms", pa.float64()),
        ("feedback", pa.string()),
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("record_hash", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("reason", pa.string()),
        ("excerpt", pa.string()),
    ]
)

# Quarantined lines keep a short excerpt so that a person can see what went wrong; the raw zone
# is the only place that holds it.
EXCERPT_CHARS = 160


class MalformedCall(ValueError):
    """A log line that is not a usable LLM call; the message is the quarantine reason."""


@dataclass
class IngestResult:
    traces: pd.DataFrame
    quarantine: pd.DataFrame
    files: list[str] = field(default_factory=list)
    repeated: int = 0  # lines identical to a call already read (a file landed twice, say)

    @property
    def lines_read(self) -> int:
        return len(self.traces) + len(self.quarantine) + self.repeated


def find_log_files(landing_dir: Path) -> list[Path]:
    """The JSONL files of a landing folder, oldest name first, with a clear error if none."""
    landing_dir = Path(landing_dir)
    if not landing_dir.is_dir():
        raise FileNotFoundError(
            f"Landing folder {landing_dir} does not exist. Point SLM_LANDING_DIR at the folder "
            "that holds your agent's JSONL logs."
        )
    files = sorted(p for p in landing_dir.rglob("*.jsonl") if p.is_file())
    if not files:
        raise FileNotFoundError(
            f"Landing folder {landing_dir} holds no *.jsonl files. Each file should hold one "
            "logged LLM call per line in the OpenAI request/response format (see README)."
        )
    return files


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise MalformedCall(reason)


def _parse_time(value: Any) -> datetime:
    _require(isinstance(value, str) and value.strip() != "", "missing created_at")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as err:
        raise MalformedCall(f"created_at is not an ISO-8601 time: {value!r}") from err
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _optional_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def record_hash(record: Any) -> str:
    """A stable hash of a logged record's content, whatever its key order or whitespace."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_call(record: Any) -> dict[str, Any]:
    """Turn one decoded log record into a canonical trace row, or raise MalformedCall."""
    _require(isinstance(record, dict), f"line is a JSON {type(record).__name__}, not an object")
    trace_id = record.get("id")
    _require(isinstance(trace_id, str) and trace_id != "", "id is missing or not a string")
    called_at = _parse_time(record.get("created_at"))

    request = record.get("request")
    _require(isinstance(request, dict), "request is missing or not an object")
    messages = request.get("messages")
    _require(isinstance(messages, list) and len(messages) > 0, "request.messages is empty")
    _require(
        all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages),
        "a request message has no role",
    )
    tools = request.get("tools")
    _require(tools is None or isinstance(tools, list), "request.tools is not a list")

    response = record.get("response")
    _require(isinstance(response, dict), "response is missing or not an object")
    choices = response.get("choices")
    _require(isinstance(choices, list) and len(choices) > 0, "response has no choices")
    choice = choices[0]
    _require(isinstance(choice, dict), "response choice is not an object")
    message = choice.get("message")
    _require(isinstance(message, dict), "response choice has no message")

    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    latency = record.get("latency_ms")
    return {
        "trace_id": trace_id,
        "called_at": called_at,
        "agent": metadata.get("agent"),
        "session_id": metadata.get("session_id"),
        "model": request.get("model"),
        "messages": json.dumps(messages, ensure_ascii=False),
        "tools": json.dumps(tools, ensure_ascii=False) if tools else None,
        "response_message": json.dumps(message, ensure_ascii=False),
        "finish_reason": choice.get("finish_reason"),
        "prompt_tokens": _optional_int(usage.get("prompt_tokens")),
        "completion_tokens": _optional_int(usage.get("completion_tokens")),
        "total_tokens": _optional_int(usage.get("total_tokens")),
        "latency_ms": float(latency) if _optional_int(latency) is not None else None,
        "feedback": metadata.get("feedback"),
    }


def _decode_line(raw: bytes) -> Any:
    if raw.strip() == b"":
        raise MalformedCall("empty line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedCall(f"invalid UTF-8 at byte {err.start}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedCall(f"invalid JSON ({err.msg} at column {err.colno})") from err


def read_log_file(path: Path) -> tuple[list[dict], list[dict]]:
    """Parse one JSONL file line by line into (trace rows, quarantine rows)."""
    rows, quarantined = [], []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                record = _decode_line(raw)
                row = parse_call(record)
            except MalformedCall as err:
                quarantined.append(
                    {
                        "source_file": str(path),
                        "source_line": line_number,
                        "reason": str(err),
                        "excerpt": raw[:EXCERPT_CHARS].decode("utf-8", errors="replace").rstrip(),
                    }
                )
                continue
            row["source_file"] = str(path)
            row["source_line"] = line_number
            row["record_hash"] = record_hash(record)
            rows.append(row)
    return rows, quarantined


def ingest(files: Iterable[Path], now: datetime | None = None) -> IngestResult:
    """Read every file into one trace table and one quarantine table.

    Ingesting is idempotent: a record identical to one already read (the same file landed twice,
    or a proxy that wrote a line twice) adds nothing and is only counted. A trace id that comes
    back with different content keeps its first row; the later ones are quarantined with the
    reason, so the trace id stays a key.
    """
    now = now or datetime.now(timezone.utc)
    rows, quarantined, names = [], [], []
    for path in files:
        file_rows, file_quarantine = read_log_file(Path(path))
        rows.extend(file_rows)
        quarantined.extend(file_quarantine)
        names.append(str(path))

    first_hash: dict[str, str] = {}
    unique_rows, repeated = [], 0
    for row in rows:
        known = first_hash.get(row["trace_id"])
        if known == row["record_hash"]:
            repeated += 1
            continue
        if known is not None:
            quarantined.append(
                {
                    "source_file": row["source_file"],
                    "source_line": row["source_line"],
                    "reason": f"trace id {row['trace_id']} already ingested with different content",
                    "excerpt": row["trace_id"],
                }
            )
            continue
        first_hash[row["trace_id"]] = row["record_hash"]
        row["ingested_at"] = now
        unique_rows.append(row)

    traces = pd.DataFrame(unique_rows, columns=TRACE_SCHEMA.names)
    traces = traces.sort_values(["called_at", "trace_id"], kind="stable").reset_index(drop=True)
    quarantine = pd.DataFrame(quarantined, columns=QUARANTINE_SCHEMA.names)
    return IngestResult(traces=traces, quarantine=quarantine, files=names, repeated=repeated)


def quarantine_reasons(quarantine: pd.DataFrame) -> dict[str, int]:
    """Counts of quarantined lines by kind of reason (the reason up to its first detail)."""
    kinds = quarantine["reason"].str.replace(r" \(.*| at byte .*|: .*", "", regex=True)
    return {str(k): int(v) for k, v in kinds.value_counts().items()}
