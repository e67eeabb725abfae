import json

from pipeline import curate


def _all_text(frame) -> str:
    return "\n".join(frame["messages"]) + "\n" + "\n".join(frame["response_message"])


def test_no_canary_survives_scrubbing(curation, labels):
    text = _all_text(curation.curated)
    surviving = [c for c in labels["canaries"] if c in text]
    assert surviving == []
    assert curation.findings["EMAIL_ADDRESS"] >= 199 and curation.findings["API_KEY"] >= 124


def test_known_pii_check_finds_nothing_after_scrubbing_and_everything_before(ingested, curation):
    assert sum(curate.find_leaks(curation.curated["messages"]).values()) == 0
    before = curate.find_leaks(ingested.traces["messages"])
    assert all(count > 0 for count in before.values()), before


def test_scrubbing_keeps_task_content_that_is_not_personal():
    scrubber = curate.Scrubber()
    text = "Hi, this is Ingrid Jones. Check in on the 12 Oct for 3 nights, 2 adults, $450 total."
    scrubbed = scrubber.scrub(text)
    assert "Ingrid Jones" not in scrubbed and "<PERSON>" in scrubbed
    for kept in ("12 Oct", "3 nights", "2 adults", "$450"):
        assert kept in scrubbed


def test_tool_call_arguments_are_scrubbed_and_stay_valid_json():
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "send_email",
                    "arguments": json.dumps({"to": "ada.lovelace77@gmail.com", "cc": ["(205) 638-4234"], "count": 3}),
                },
            }
        ],
    }
    scrubbed = curate.map_message_texts(message, curate.Scrubber().scrub)
    arguments = json.loads(scrubbed["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"to": "<EMAIL_ADDRESS>", "cc": ["<PHONE_NUMBER>"], "count": 3}


def test_exact_duplicates_are_removed_keeping_the_earliest(ingested, curation, labels):
    removed = curation.removed[curation.removed["reason"] == "exact duplicate"]
    resends = {copy for _, copy in labels["dups"]["exact"]}
    caught = resends & set(removed["trace_id"])
    assert len(caught) / len(resends) >= 0.99
    # a removed call and the call it duplicates have identical content and the kept one is older
    times = ingested.traces.set_index("trace_id")["called_at"]
    assert (times[removed["trace_id"]].to_numpy() >= times[removed["duplicate_of"]].to_numpy()).all()
    assert not set(removed["trace_id"]) & set(curation.curated["trace_id"])
    assert curation.counts()["curated"] + len(curation.removed) == len(ingested.traces)


def test_unusable_answers_are_recognized():
    assert curate.unusable_reason('{"role": "assistant", "content": ""}', "stop") == "empty answer"
    assert curate.unusable_reason('{"role": "assistant", "content": "par"}', "length").startswith("truncated")
    tool_call = '{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]}'
    assert curate.unusable_reason(tool_call, "tool_calls") is None
