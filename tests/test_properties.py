"""Property-based tests (hypothesis) over the trace parsers and the PII scrubber: any input either
parses or is quarantined and nothing raises; scrubbing never raises, keeps tool-call arguments
valid JSON of the same shape, and never lets a generated e-mail, card number or API key through."""

import json
import string
import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline import curate, ingest, sources
from tests.conftest import FORMATS, LANDING

# ---------------------------------------------------------------------------------------------
# Trace parsers

SAMPLE_RECORDS = [json.loads(line) for line in (LANDING / "traces-2026-10-01.jsonl").read_text().splitlines()[:40]
                  if line.strip().startswith("{") and '"response"' in line][:20]

SAMPLE_LINES = {json.dumps(r).encode() for r in SAMPLE_RECORDS}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every place in a JSON value where a subtree can be swapped."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def mutated_records(draw):
    """A logged call with one subtree replaced by arbitrary JSON (a wrong type, a missing part,
    odd text), so that the adapters' every branch sees bad input."""
    record = draw(st.sampled_from(SAMPLE_RECORDS))
    path = draw(st.sampled_from(list(_paths(record))))
    return json.dumps(_replaced(record, path, draw(json_values))).encode()


log_lines = st.one_of(
    st.sampled_from(SAMPLE_RECORDS).map(lambda r: json.dumps(r).encode()),
    mutated_records(),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
)


def _ingest_bytes(payload: bytes, name: str = "landing.jsonl") -> ingest.IngestResult:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(payload)
        return ingest.read_calls([path])


# A file is read by its content: one that starts with gzip's or a sealed file's magic bytes is read
# as such, and quarantined whole when it is not one (tests/test_ingest.py); plain logs here.
plain_log_files = st.lists(log_lines, min_size=1, max_size=8).filter(
    lambda lines: not lines[0].startswith((sources.GZIP_MAGIC, sources.ZSTD_MAGIC, sources.SEALED_MAGIC)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain_log_files)
@example([b"{", json.dumps(SAMPLE_RECORDS[0]).encode()])  # a broken first record: JSON lines, not a document
def test_every_line_of_any_log_file_is_a_call_or_quarantined(lines):
    result = _ingest_bytes(b"\n".join(lines) + b"\n")
    stats = result.stats
    if stats.formats.get("unreadable"):  # no line looks like any log format: the file is quarantined whole
        assert stats.calls == 0 and list(result.quarantine["source_line"]) == [0]
        assert not set(lines) & SAMPLE_LINES  # which happens only when no line is a whole logged call
    else:  # every line is accounted for: stored, a repeat of one stored, skipped as not a call, or quarantined
        assert stats.calls + stats.repeated + sum(stats.skipped.values()) + stats.quarantined == len(lines)
    assert len(result.traces) == stats.calls and len(result.quarantine) == stats.quarantined
    assert result.traces["trace_id"].is_unique
    assert (result.quarantine["reason"].str.len() > 0).all()
    for messages in result.traces["messages"]:
        assert isinstance(json.loads(messages), list) and json.loads(messages)


FORMAT_FILES = sorted(p for p in FORMATS.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FORMAT_FILES), st.data())
def test_any_damage_to_a_file_of_any_format_is_parsed_or_quarantined_never_raised(path, data):
    payload = path.read_bytes()
    start = data.draw(st.integers(0, len(payload)))
    end = data.draw(st.integers(start, min(len(payload), start + 64)))
    damaged = payload[:start] + data.draw(st.binary(max_size=16)) + payload[end:]
    result = _ingest_bytes(damaged, path.name)
    assert result.traces["trace_id"].is_unique
    assert len(result.quarantine) == result.stats.quarantined
    # the file was taken in (its calls stored, its damage quarantined with reasons) or, a batch
    # input file, kept as the companion of an output file
    assert result.stats.files_read + result.stats.batch_input_files == 1
    assert (result.quarantine["reason"].str.len() > 0).all()


# Damage of another kind: any subtree of a record replaced by JSON of any shape (a LangSmith
# export's cells, an OTLP attribute of the wrong type), each record through its format's adapter.
def _fixture_records() -> list[tuple[str, dict]]:
    from pipeline.formats import registry

    # a LangSmith export holds inputs, outputs and extra as JSON text, which the adapter also reads
    # decoded: decoded, their insides are damaged too
    records = [("langsmith", {k: json.loads(v) if k in ("inputs", "outputs", "extra") and v else v for k, v in r.value.items()})
               for r in sources.read_table(FORMATS / "langsmith_runs.parquet")]
    for name in ("otel_genai_spans.jsonl", "otel_genai_logs.jsonl", "langfuse_traces.jsonl",
                 "langfuse_blob_observations_v2.jsonl", "canonical.jsonl", "openai_chat_multiturn.jsonl"):
        for line in (FORMATS / name).read_text().splitlines():
            record = json.loads(line)
            records.append((registry.detect([record]), record))
    return records


FIXTURE_RECORDS = _fixture_records()


@st.composite
def damaged_fixture_records(draw):
    name, record = draw(st.sampled_from(FIXTURE_RECORDS))
    path = draw(st.sampled_from(list(_paths(record))))
    return name, _replaced(record, path, draw(json_values))


@settings(max_examples=400, deadline=None)
@given(damaged_fixture_records())
def test_any_subtree_of_a_record_of_any_format_may_be_of_any_shape_it_is_parsed_or_quarantined_never_raised(damaged):
    from pipeline.formats import registry

    name, record = damaged
    for outcome in registry.ADAPTERS[name].outcomes(record, None):
        assert sum(x is not None for x in (outcome.row, outcome.error, outcome.skipped)) == 1


# ---------------------------------------------------------------------------------------------
# PII scrubber

words = st.lists(st.sampled_from("the order please send it to and call me about invoice 42 on Monday at noon".split()),
                 max_size=8).map(" ".join)
separators = st.sampled_from([" ", "\n", ", ", ": ", " (", ") ", ' "', '" ', " <", "> ", "\t"])


@st.composite
def emails(draw):
    local = ".".join(draw(st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_%+-]{0,10}", fullmatch=True), min_size=1, max_size=3)))
    labels = draw(st.lists(st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1, max_size=2))
    return f"{local}@{'.'.join(labels)}.{draw(st.sampled_from(['com', 'org', 'net', 'io', 'de', 'co.uk', 'info']))}"


def _luhn_completed(digits: str) -> str:
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return digits + str((10 - total % 10) % 10)


@st.composite
def card_numbers(draw):
    prefix, length = draw(st.sampled_from([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("23", 16), ("26", 16), ("2720", 16),
                                            ("37", 15), ("34", 15), ("6011", 16), ("65", 16)]))
    body = prefix + "".join(draw(st.lists(st.sampled_from(string.digits), min_size=length - len(prefix) - 1,
                                          max_size=length - len(prefix) - 1)))
    number = _luhn_completed(body)
    spacer = draw(st.sampled_from(["", " ", "-"]))
    groups = [number[i:i + 4] for i in range(0, len(number), 4)] if length == 16 else [number[:4], number[4:10], number[10:]]
    return spacer.join(groups)


def _alnum(size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=string.ascii_letters + string.digits, min_size=size, max_size=size)


api_keys = st.one_of(
    st.builds(lambda body: f"sk-{body}", _alnum(48)),
    st.builds(lambda body: f"sk-proj-{body}", _alnum(40)),
    st.builds(lambda body: f"sk-ant-api03-{body}", _alnum(40)),
    st.builds(lambda body: f"AKIA{body}", st.text(alphabet=string.ascii_uppercase + string.digits, min_size=16, max_size=16)),
    st.builds(lambda body: f"ghp_{body}", _alnum(36)),
    st.builds(lambda body: f"xoxb-{body}", st.text(alphabet=string.digits + "-", min_size=24, max_size=30)),
    st.builds(lambda body: f"sk_live_{body}", _alnum(24)),
    st.builds(lambda body: f"AIza{body}", _alnum(35)),
)
secrets_ = st.one_of(emails(), card_numbers(), api_keys)


def _scrub_one_call(messages: list[dict], response: dict) -> tuple[list[dict], dict]:
    frame = pd.DataFrame({"messages": [json.dumps(messages)], "response_message": [json.dumps(response)]})
    scrubbed = curate.scrub_calls(frame, curate.Scrubber(processes=1))
    return json.loads(scrubbed["messages"][0]), json.loads(scrubbed["response_message"][0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secret=secrets_, before=words, after=words, left=separators, right=separators, nested=st.booleans())
def test_a_generated_email_card_number_or_api_key_never_survives_scrubbing(secret, before, after, left, right, nested):
    text = f"{before}{left}{secret}{right}{after}"
    arguments = {"note": text, "recipients": [{"value": secret}]} if nested else {"value": secret, "count": 2}
    messages = [{"role": "system", "content": "You are an assistant."}, {"role": "user", "content": text}]
    response = {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "send", "arguments": json.dumps(arguments)}}]}
    scrubbed_messages, scrubbed_response = _scrub_one_call(messages, response)
    everything = json.dumps([scrubbed_messages, scrubbed_response])
    assert secret not in everything
    assert secret.replace(" ", "").replace("-", "") not in everything.replace(" ", "").replace("-", "") or "@" in secret
    scrubbed_arguments = json.loads(scrubbed_response["tool_calls"][0]["function"]["arguments"])  # still valid JSON
    assert _shape(scrubbed_arguments) == _shape(arguments)


def _shape(value):
    """The JSON's structure and non-string values: scrubbing may change strings only (inside
    tool-call arguments keys are strings too, and distinct keys stay distinct)."""
    if isinstance(value, dict):
        return ("object", sorted((repr(_shape(v)) for v in value.values())))
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return str if isinstance(value, str) else value


tool_arguments = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arguments=tool_arguments, content=st.text(max_size=200), raw_arguments=st.text(max_size=60))
def test_scrubbing_any_call_never_raises_and_keeps_tool_arguments_valid_json(arguments, content, raw_arguments):
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": raw_arguments}}]},
                {"role": "tool", "tool_call_id": "a", "content": content}]
    response = {"role": "assistant", "content": None,
                "tool_calls": [{"id": "b", "type": "function", "function": {"name": "g", "arguments": json.dumps(arguments)}}]}
    scrubbed_messages, scrubbed_response = _scrub_one_call(messages, response)
    assert _shape(json.loads(scrubbed_response["tool_calls"][0]["function"]["arguments"])) == _shape(arguments)
    # arguments that were not JSON stay a string (scrubbed as text), and JSON ones stay JSON
    kept = scrubbed_messages[1]["tool_calls"][0]["function"]["arguments"]
    assert isinstance(kept, str)
    if _is_json(raw_arguments):
        assert _is_json(kept)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The whole path: generated traffic through collection and curation

# Numbers that are no one's personal data, of the shapes agents pass around: they must come out
# of curation exactly as they went in, and must never set a call aside.
def _digits(size: int, first: str = string.digits) -> st.SearchStrategy[str]:
    return st.builds(lambda head, tail: head + tail, st.sampled_from(first),
                     st.text(alphabet=string.digits, min_size=size - 1, max_size=size - 1))


def _not_luhn(digits: str) -> str:
    """The same digits with the last one changed so that the checksum fails."""
    valid = _luhn_completed(digits[:-1])
    return valid[:-1] + str((int(valid[-1]) + 1) % 10)


def _no_phone_number(digits: str) -> bool:
    """Whether no region the scrubber checks reads the digits as a valid phone number. Some long
    references do read as one ("4900201000000008": +49 201000000008, a German number written
    with its country code) and are scrubbed as phone numbers: an ambiguity settled for privacy."""
    import phonenumbers
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    return not any(True for region in PhoneRecognizer().supported_regions for _ in phonenumbers.PhoneNumberMatcher(digits, region))


harmless_numbers = st.one_of(
    st.integers(1_500_000_000, 1_900_000_000).map(str),  # epoch seconds
    st.integers(1_500_000_000_000, 1_900_000_000_000).map(str),  # epoch milliseconds
    st.datetimes().map(lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")),
    st.tuples(st.integers(1, 99_999), st.integers(0, 99)).map(lambda a: f"${a[0]:,}.{a[1]:02d}"),
    # a planner's arithmetic; three groups of 3, 3 and 4 digits are a phone number's shape, and count as one
    st.integers(1_000, 99_999).flatmap(lambda a: st.tuples(st.just(a), st.integers(10, a // 2), st.integers(10, a // 2))).map(
        lambda n: f"{n[0]}-{n[1]}-{n[2]}={n[0] - n[1] - n[2]}"),
    _digits(8, "123456789").filter(_no_phone_number),  # order and ticket numbers
    _digits(16, "4").map(_not_luhn).filter(_no_phone_number),  # a card-length reference that is no card
    _digits(16, "9").filter(_no_phone_number),  # card-length, no card network's prefix
    _digits(22, "9").filter(_no_phone_number),  # parcel tracking numbers
    st.tuples(*[st.integers(0, 30)] * 3).map(lambda v: f"v{v[0]}.{v[1]}.{v[2]}"),
)
us_phones = st.tuples(st.integers(201, 989), st.integers(200, 999), st.integers(0, 9999)).map(
    lambda p: f"({p[0]}) {p[1]}-{p[2]:04d}")
canaries = st.one_of(emails(), card_numbers(), api_keys, us_phones)


@st.composite
def agent_calls(draw, index: int):
    """One logged call: numbers in the question and in the tool call's arguments (as JSON numbers
    where they are digits), and maybe one planted canary."""
    numbers = draw(st.lists(harmless_numbers, min_size=1, max_size=3))
    canary = draw(st.none() | canaries)
    words_before, words_after = draw(words), draw(words)
    question = f"request {index}: {words_before} {' and '.join(numbers)} {words_after}"
    if canary:
        question += f" {draw(separators)}{canary}"
    arguments = {f"field_{i}": int(n) if n.isdigit() and len(n) < 16 else n for i, n in enumerate(numbers)}
    if canary and draw(st.booleans()):
        arguments["contact"] = canary
    record = {"id": f"call-{index}", "created_at": "2026-11-02T10:00:00Z",
              "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": question}]},
              "response": {"choices": [{"finish_reason": "tool_calls", "message": {
                  "role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps(arguments)}}]}}]}}
    return json.dumps(record), numbers, canary


@st.composite
def traffic(draw):
    return [draw(agent_calls(i)) for i in range(draw(st.integers(1, 6)))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(traffic())
def test_generated_traffic_loses_every_canary_keeps_every_harmless_number_and_never_stops_on_one(calls):
    ingested = _ingest_bytes(("\n".join(line for line, _, _ in calls) + "\n").encode())
    assert len(ingested.traces) + len(ingested.quarantine) == len(calls)  # no call lost
    result = curate.curate(ingested.traces)
    curated = result.curated.set_index("trace_id")
    for index, (_, numbers, canary) in enumerate(calls):
        call_id = f"call-{index}"
        if call_id not in curated.index:  # removed: a duplicate, or set aside for a canary scrubbing missed
            reason = result.removed.set_index("trace_id").loc[call_id, "reason"]
            assert reason in ("exact duplicate", "near duplicate") or (reason == curate.POSSIBLE_PERSONAL_DATA and canary)
            continue
        text = curated.loc[call_id, "messages"] + curated.loc[call_id, "response_message"]
        assert [n for n in numbers if n not in text] == []  # every harmless number intact
        if canary:
            assert canary not in text and canary.replace(" ", "").replace("-", "") not in text.replace(" ", "").replace("-", "")
    assert curate.sweep_leaks(result.curated) == {}  # what the blocking check guards
    assert canary_free(result.removed)


def canary_free(removed: pd.DataFrame) -> bool:
    """The removal record says where, never what: no digit run or address in it."""
    return not removed["where"].dropna().astype(str).str.contains(r"\d{6}|@").any()
