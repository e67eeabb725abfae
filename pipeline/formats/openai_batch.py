"""OpenAI Batch API files: an output file's results joined with the requests of its input file.

Input file line:  {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {request}}
Output file line: {"id", "custom_id", "response": {"status_code", "request_id", "body": {completion}},
                   "error": null | {"code", "message"}}

custom_ids are unique within one batch only, so an output file is joined with one input file:
the file of the same name with "output" replaced by "input" (`batch_abc_output.jsonl` ->
`batch_abc_input.jsonl`), or else the only batch input file in the same folder. Input files hold
no answers and are read only through their output file; requests are indexed on disk (SQLite), so
a batch of any size is joined in bounded memory.
"""

from __future__ import annotations

import json
import sqlite3
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from pipeline import sources
from pipeline.formats import MalformedCall, Outcome, call_row, one_call, parse_time, require, scalar_fields

NAME = "openai_batch"
INPUT_NAME = "openai_batch_input"
ITEM_PATHS = ("item",)
CHAT_URL = "/v1/chat/completions"


def looks_like(record: Any) -> bool:
    return isinstance(record, dict) and "custom_id" in record and ("response" in record or "error" in record)


def looks_like_input(record: Any) -> bool:
    return isinstance(record, dict) and "custom_id" in record and "body" in record and "url" in record


def input_file_for(output_path: Path, input_files: list[Path]) -> Path | None:
    """The batch input file an output file answers, by name, else the folder's only one."""
    name = output_path.name
    if "output" in name:
        head, _, tail = name.rpartition("output")
        named = output_path.with_name(head + "input" + tail)
        if named in input_files:
            return named
    same_folder = [p for p in input_files if p.parent == output_path.parent]
    return same_folder[0] if len(same_folder) == 1 else None


class BatchRequests:
    """The requests of one batch input file, by custom_id, in a SQLite file beside the run."""

    def __init__(self, input_path: Path | None, index_path: Path):
        self.input_path = input_path
        index_path.unlink(missing_ok=True)  # an index is built for one join only
        self._db = sqlite3.connect(index_path)
        self._db.execute("CREATE TABLE IF NOT EXISTS requests (custom_id TEXT PRIMARY KEY, url TEXT, body TEXT)")
        if input_path is not None:
            rows = (
                (str(item.value["custom_id"]), str(item.value.get("url")), json.dumps(item.value.get("body")))
                for item in sources.read_lines(input_path)
                if isinstance(item, sources.Record) and looks_like_input(item.value)
            )
            self._db.executemany("INSERT OR REPLACE INTO requests VALUES (?, ?, ?)", rows)

    def request(self, custom_id: str) -> tuple[str, dict]:
        if self.input_path is None:
            raise MalformedCall(
                "no batch input file to join with: land it beside the output file, named like it "
                "with 'output' replaced by 'input'"
            )
        found = self._db.execute("SELECT url, body FROM requests WHERE custom_id = ?", (custom_id,)).fetchone()
        if found is None:
            raise MalformedCall(f"custom_id not in the batch input file ({custom_id!r}, {self.input_path.name})")
        return found[0], json.loads(found[1])

    def close(self) -> None:
        self._db.close()


def parse(result: Any, request: dict | MalformedCall | None) -> dict:
    """One batch result as a call; `request` is its request body looked up in the input file, or
    why it could not be (raised only once the result itself is found sound)."""
    require(isinstance(result, dict), f"line is a JSON {type(result).__name__}, not an object")
    custom_id = result.get("custom_id")
    require(isinstance(custom_id, str) and custom_id != "", "custom_id is missing or not a string")
    error = result.get("error")
    require(not error, f"batch request failed: {json.dumps(error)[:200]}")
    response = result.get("response")
    require(isinstance(response, dict), "response is missing or not an object")
    status = response.get("status_code")
    require(status == 200, f"batch request failed with HTTP status {status}")
    body = response.get("body")
    require(isinstance(body, dict), "response.body is missing or not an object")
    if isinstance(request, MalformedCall):
        raise request
    require(isinstance(request, dict), "the batch request has no body")
    choices = body.get("choices")
    require(isinstance(choices, list) and len(choices) > 0 and isinstance(choices[0], dict), "response has no choices")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    context = scalar_fields(request.get("metadata"))
    if isinstance(request.get("user"), str):
        context["user"] = request["user"]
    return call_row(
        trace_id=body.get("id") or result.get("id"),
        called_at=parse_time(body.get("created"), "response.body.created"),
        messages=request.get("messages"),
        tools=request.get("tools"),
        response_message=choices[0].get("message"),
        model=request.get("model") or body.get("model"),
        answered_by=body.get("model"),
        finish_reason=choices[0].get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
        context=context,
    )


def outcomes(record: Any, source) -> Iterator[Outcome]:
    request: dict | MalformedCall | None = None
    if isinstance(record, dict) and record.get("custom_id") is not None:
        try:
            url, request = source.batch_requests.request(str(record["custom_id"]))
        except MalformedCall as missing:
            url, request = CHAT_URL, missing  # parse() reports it after checking the result
        if url != CHAT_URL:
            yield Outcome(skipped=f"batch request to {url}", piece=record)
            return
    yield from one_call(record, partial(parse, request=request))
