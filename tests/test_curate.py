import json

import numpy
import pandas as pd
import pytest

from pipeline import curate
from tests import score_run


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
    seeded = ["email address", "card number", "US phone number", "OpenAI or Anthropic secret key (sk-, sk-proj-, sk-ant-)"]
    assert all(before[kind] > 0 for kind in seeded), before  # the kinds the sample's canaries are


def test_scrubbing_keeps_task_content_that_is_not_personal():
    scrubber = curate.Scrubber()
    text = "Hi, this is Ingrid Jones. Check in on the 12 Oct for 3 nights, 2 adults, $450 total."
    scrubbed = scrubber.scrub(text)
    assert "Ingrid Jones" not in scrubbed and "<PERSON_1>" in scrubbed
    for kept in ("12 Oct", "3 nights", "2 adults", "$450"):
        assert kept in scrubbed


SECRETS = {
    "OpenAI key": "export OPENAI_API_KEY=sk-proj-4fGh7JkL9mNpQrStUvWx2yZa",
    "Anthropic key": "client = Anthropic(api_key='sk-ant-api03-Xy7_kLmN0pQrStUv-WxYz12345')",
    "AWS key pair": "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "GitHub token": "git clone https://ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789@github.com/acme/app",
    "GitHub fine-grained token": "GH_TOKEN=github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuv",
    "Slack bot token": "SLACK_BOT_TOKEN=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "Slack webhook": "post to https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
    "Stripe key": "stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'",
    "Google key": "https://maps.googleapis.com/maps/api/geocode/json?key=AIzaSyB-1234567890abcdefghijklmnopqrstu",
    "JWT": "token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "bearer header": "curl -H 'Authorization: Bearer 7f3a9c2e1b8d4f6a0c5e9b2d7a1f3c8e' https://api.acme.dev",
    "private key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----",
    "password in URL": "DATABASE_URL=postgres://app:Tr0ub4dor&3@db.internal:5432/orders",
    "password field": 'login payload {"user": "ops", "password": "correct-horse-battery"}',
}
SECRET_VALUES = [
    "sk-proj-4fGh7JkL9mNpQrStUvWx2yZa", "sk-ant-api03-Xy7_kLmN0pQrStUv-WxYz12345", "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuv", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "hooks.slack.com/services/T00000000", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "AIzaSyB-1234567890abcdefghijklmnopqrstu",
    "eyJhbGciOiJIUzI1NiJ9", "7f3a9c2e1b8d4f6a0c5e9b2d7a1f3c8e", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ",
    "Tr0ub4dor&3", "correct-horse-battery",
]


@pytest.mark.parametrize("kind", SECRETS)
def test_secrets_of_every_common_shape_are_scrubbed_and_the_check_would_catch_them(kind):
    text = SECRETS[kind]
    scrubbed = curate.Scrubber().scrub(text)
    assert not [value for value in SECRET_VALUES if value in scrubbed], scrubbed
    assert sum(curate.find_leaks([text]).values()) > 0  # the blocking check sees the raw secret
    assert sum(curate.find_leaks([scrubbed]).values()) == 0  # and nothing after scrubbing


def test_words_around_secrets_and_capitalized_words_survive():
    scrubbed = curate.Scrubber().scrub("This is the best hotel. Connect to postgres://app:Tr0ub4dor&3@db.internal:5432/orders")
    assert scrubbed.startswith("This is the best hotel.")  # a name pattern must not take any word
    assert "postgres://app:<PASSWORD_1>@db.internal:5432/orders" in scrubbed


def test_one_value_gets_one_placeholder_throughout_a_call():
    traces = pd.DataFrame(
        {
            "trace_id": ["a", "b"],
            "messages": [
                json.dumps([{"role": "user", "content": "Mail ada.lovelace77@gmail.com and grace.h@navy.mil, then ada.lovelace77@gmail.com again"}]),
                json.dumps([{"role": "user", "content": "Mail grace.h@navy.mil"}]),
            ],
            "response_message": [
                json.dumps({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "send", "arguments": json.dumps({"to": "grace.h@navy.mil"})}}]}),
                json.dumps({"role": "assistant", "content": "Sent to grace.h@navy.mil"}),
            ],
        }
    )
    scrubbed = curate.scrub_calls(traces, curate.Scrubber())
    first = json.loads(scrubbed["messages"][0])[0]["content"]
    assert first == "Mail <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>, then <EMAIL_ADDRESS_1> again"
    answer = json.loads(scrubbed["response_message"][0])["tool_calls"][0]["function"]["arguments"]
    assert json.loads(answer) == {"to": "<EMAIL_ADDRESS_2>"}  # the same address as in the question
    # numbering starts again in every call
    assert json.loads(scrubbed["messages"][1])[0]["content"] == "Mail <EMAIL_ADDRESS_1>"
    assert json.loads(scrubbed["response_message"][1])["content"] == "Sent to <EMAIL_ADDRESS_1>"


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
    scrubbed = curate.map_strings(message, lambda text, _parameter: curate.Scrubber().scrub(text))
    arguments = json.loads(scrubbed["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"to": "<EMAIL_ADDRESS_1>", "cc": ["<PHONE_NUMBER_1>"], "count": 3}


def _tool_call(name: str, arguments: dict) -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def test_names_found_in_arguments_for_places_and_products_stay_in_the_whole_call():
    # the small NER model calls "Austin" and "Animal Crossing" persons; the parameters say otherwise
    messages = [{"role": "user", "content": "Is the Yamaha guitar in stock in Austin? Ask Jennifer Walsh."}]
    answer = _tool_call("check_stock", {"city": "Austin", "product": "Yamaha guitar", "contact": "Jennifer Walsh"})
    traces = pd.DataFrame({"messages": [json.dumps(messages)], "response_message": [json.dumps(answer)]})
    scrubber = curate.Scrubber()
    assert "PERSON" in scrubber.marked("Austin")  # what the model says on its own
    scrubbed = curate.scrub_calls(traces, scrubber).iloc[0]
    arguments = json.loads(json.loads(scrubbed["response_message"])["tool_calls"][0]["function"]["arguments"])
    assert arguments["city"] == "Austin" and "Austin" in scrubbed["messages"]  # the pair stays coherent
    assert arguments["contact"] == "<PERSON_1>" and "Jennifer" not in scrubbed["messages"]


def test_parameters_named_for_people_and_free_text_keep_every_finding():
    answer = _tool_call("send", {"artist": "Taylor Swift", "body": "Dear Ingrid Jones, see you", "game_name": "Zelda"})
    released = curate.released_names([answer], curate.Scrubber().marked)
    assert "taylor swift" not in released and "ingrid jones" not in released
    assert curate._parameter_words("gameName") == curate._parameter_words("Game-Name") == {"game", "name"}


def test_code_identifiers_are_not_persons():
    scrubber = curate.Scrubber()
    for identifier in ("myContainer", "userInputField"):
        assert scrubber.scrub(f"Restart {identifier} on myNode now.") == f"Restart {identifier} on myNode now."


def test_phone_numbers_are_found_as_presidio_finds_them_while_short_digit_groups_are_skipped(ingested):
    import phonenumbers
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    tuned = next(r for r in curate.build_analyzer().registry.recognizers if r.name == "PhoneRecognizer")
    assert type(tuned) is not PhoneRecognizer
    # a German number can have 4 digits; written internationally a number has at least 7
    # characters ("+49" and 4 digits); no NANP number has fewer than 7 digits
    assert curate.shortest_phone_candidate("DE", tuned.leniency) == 4
    assert [curate.shortest_phone_candidate(region, tuned.leniency) for region in ("US", "CA", "GB")] == [7, 7, 7]
    # where merely possible numbers count, so do German numbers dialled locally (2 digits)
    assert curate.shortest_phone_candidate("DE", 0) == 2
    # Antigua's national prefix rule prepends its area code (3 digits never written) to a local
    # number: the shortest NANP length, 7, less those 3
    assert [m.raw_string for m in phonenumbers.PhoneNumberMatcher("call 462-1234", "AG")] == ["462-1234"]
    assert curate.shortest_phone_candidate("AG", tuned.leniency) == 4

    texts = sorted({t for m, r in zip(ingested.traces["messages"], ingested.traces["response_message"])
                    for t in curate.texts_of_call(json.loads(m), json.loads(r)) if any(c.isdigit() for c in t)})
    texts += ["Ring +49 30 901820 or 030 901820, ext. 12", "+44 20 7946 0958 / 07700 900123", "call (205) 638-4234 x 7",
              "+1-202-555-0143, 12 apples, 3.5 kg, 2026", "+972 3-123-4567 or 98765 43210",
              # numbers the matcher finds only inside a longer candidate that is no number
              "Tickets 2 - 030 901820", "Room 5. 030 901820", "call 7 (205) 638-4234", "A12 - 089 1234",
              "4 - (202) 555-0143 or 10 - 0761 1234"]
    plain = PhoneRecognizer()
    found_plain = [[(f.start, f.end, f.score) for f in plain.analyze(t, ["PHONE_NUMBER"])] for t in texts]
    found_tuned = [[(f.start, f.end, f.score) for f in tuned.analyze(t, ["PHONE_NUMBER"])] for t in texts]
    # the same findings, less the operands of arithmetic and amounts: the sample's math answers hold
    # `3000 - 2920 = <<3000-2920=80>>`, whose `3000 - 2920` Presidio reads as a phone number
    skipped = [(t, start, end) for t, plain_found, tuned_found in zip(texts, found_plain, found_tuned)
               for start, end, _ in set(plain_found) - set(tuned_found)]
    assert all(set(tuned_found) <= set(plain_found) for plain_found, tuned_found in zip(found_plain, found_tuned))
    assert skipped and all(curate._arithmetic_or_amount(t, start, end) for t, start, end in skipped)
    assert sum(map(len, found_tuned)) >= 150  # the sample's numbers and the hand-written ones

def test_the_stepwise_ner_finds_exactly_the_entities_spacys_own_ner_finds(ingested):
    nlp = curate.build_analyzer().nlp_engine.nlp["en"]
    assert "stepwise_ner" in nlp.pipe_names and "ner" not in nlp.pipe_names
    texts = sorted({t for m, r in zip(ingested.traces["messages"], ingested.traces["response_message"])
                    for t in curate.texts_of_call(json.loads(m), json.loads(r)) if any(c.isupper() for c in t)})
    texts = texts[::4] + ["", " ", "Mr. Jan Kowalski of Warsaw called Acme Corp. on Friday."]

    def entities(component, batch_size) -> list:
        docs = component.pipe([nlp.make_doc(t) for t in texts], batch_size=batch_size)
        return [[(e.start_char, e.end_char, e.label_) for e in doc.ents] for doc in docs]

    spacys = entities(nlp.get_pipe("ner"), 256)
    assert sum(map(len, spacys)) >= 3000  # the sample's texts are full of entities of every kind
    assert entities(nlp.get_pipe("stepwise_ner"), 256) == spacys
    assert entities(nlp.get_pipe("stepwise_ner"), 7) == spacys  # batches of one length and of many
    assert list(nlp.get_pipe("stepwise_ner").pipe([nlp.make_doc("")]))[0].ents == ()


def test_the_stepwise_ner_applies_the_move_spacy_would_where_the_best_scored_move_is_invalid():
    # Random scores put moves that are invalid in the state (I-, L- with no entity open ...) on top
    # at about every other step, and two steps have NaNs: spaCy's `transition_states` and the
    # stepwise one must still make the same moves, step by step.
    nlp = curate.build_analyzer().nlp_engine.nlp["en"]
    ner, stepwise = nlp.get_pipe("ner"), nlp.get_pipe("stepwise_ner")
    texts = ["Mr. Jan Kowalski of Warsaw called Acme Corp. on Friday.", "ok", "  spaced \n text  ", "A B C D E F G"]
    rng = numpy.random.default_rng(7)
    invalid_on_top = 0

    def where(states):
        return [(state.queue, state.stack, state.entity_is_open()) for state in states]

    for trial in range(5):
        spacys_docs, stepwise_docs = ([nlp.make_doc(t) for t in texts] for _ in range(2))
        spacys_all, stepwise_all = ner.moves.init_batch(spacys_docs), ner.moves.init_batch(stepwise_docs)
        spacys_states, stepwise_states, step = list(spacys_all), list(stepwise_all), 0
        while spacys_states:
            scores = rng.standard_normal((len(spacys_states), len(stepwise.move_names))).astype("float32")
            if trial == 0 and step in (1, 2):  # numpy's argmax takes a NaN, spaCy's never does
                scores[:, stepwise.move_names.index("U-PERSON")] = numpy.nan
            invalid_on_top += sum(not ner.moves.is_valid(state, stepwise.move_names[best])
                                  for state, best in zip(stepwise_states, scores.argmax(axis=1)))
            spacys_states = ner.transition_states(spacys_states, scores)
            stepwise_states = stepwise._apply_best_moves(stepwise_states, scores)
            assert where(stepwise_states) == where(spacys_states)
            step += 1
        assert not stepwise_states
        ner.set_annotations(spacys_docs, spacys_all)
        ner.set_annotations(stepwise_docs, stepwise_all)
        assert [[(e.start, e.end, e.label_) for e in d.ents] for d in stepwise_docs] == \
               [[(e.start, e.end, e.label_) for e in d.ents] for d in spacys_docs]
    assert invalid_on_top > 20


def test_exact_and_near_duplicates_are_removed_keeping_the_earliest(ingested, curation, labels):
    removed = curation.removed[curation.removed["reason"].isin(["exact duplicate", "near duplicate"])]
    for kind in ("exact", "near"):
        copies = {copy for _, copy in labels["dups"][kind]}
        assert len(copies & set(removed["trace_id"])) / len(copies) >= (0.99 if kind == "exact" else 0.95), kind
    in_pairs = {trace_id for pair in labels["dups"]["exact"] + labels["dups"]["near"] for trace_id in pair}
    distinct = set(ingested.traces["trace_id"]) - in_pairs
    assert len(distinct & set(removed["trace_id"])) / len(distinct) < 0.005
    # a removed call is never older than the call it duplicates, which is kept
    times = ingested.traces.set_index("trace_id")["called_at"]
    assert (times[removed["trace_id"]].to_numpy() >= times[removed["duplicate_of"]].to_numpy()).all()
    assert set(removed["duplicate_of"]) <= set(curation.curated["trace_id"])
    assert not set(removed["trace_id"]) & set(curation.curated["trace_id"])
    assert curation.counts()["curated"] + len(curation.removed) == len(ingested.traces)


def test_calls_with_negative_feedback_are_kept_for_evaluation_but_not_for_training(curation):
    incorrect = curation.curated["feedback"] == "incorrect"
    assert incorrect.sum() > 0 and not curation.curated.loc[incorrect, "trainable"].any()
    assert curation.curated.loc[~incorrect, "trainable"].all()
    assert curation.counts()["kept_out_of_training"] == incorrect.sum()


def test_unusable_answers_are_recognized():
    assert curate.unusable_reason('{"role": "assistant", "content": ""}', "stop") == "empty answer"
    assert curate.unusable_reason('{"role": "assistant", "content": "par"}', "length").startswith("truncated")
    tool_call = '{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]}'
    assert curate.unusable_reason(tool_call, "tool_calls") is None
    assert curate.unusable_reason('{"role": "assistant", "content": null, "refusal": "I can\'t help"}', "stop") == "model refused"


def test_scrubbing_leaves_the_gold_answers_of_the_steps_intact(ingested, curation, labels):
    intact = score_run.gold_intact(ingested.traces, curation.curated, labels)
    # intents, numbers, dates, times and counts carry no personal data: scrubbing leaves them
    assert intact["by_step"]["classify_intent"] == 1.0 and intact["by_step"]["solve_math"] == 1.0
    assert intact["by_step"]["extract_slots"] >= 0.99
    # tool arguments lose e-mail addresses and people's names on purpose, celebrities included
    # (NER cannot tell them from users): measured 0.96 on the sample
    assert intact["by_step"]["call_tool"] >= 0.95


def test_a_rerun_reuses_earlier_findings_without_storing_any_text(tmp_path, ingested, curation, labels):
    calls = ingested.traces.iloc[:300]
    settings = curate.scrubbing_settings(curate.DEFAULT_ENTITIES, 0.4)
    path = tmp_path / "findings.sqlite"
    first = curate.Scrubber(cache=curate.FindingsCache(path, "key-1", settings))
    scrubbed = curate.scrub_calls(calls, first)
    again = curate.Scrubber(cache=curate.FindingsCache(path, "key-1", settings))
    rescrubbed = curate.scrub_calls(calls, again)
    assert first.reused == 0 and again.reused == len(first._marked)  # nothing analyzed the second time
    assert rescrubbed.equals(scrubbed) and again.findings == first.findings
    stored = path.read_bytes()
    present = [c for c in labels["canaries"] if c in "\n".join([*calls["messages"], *calls["response_message"]])]
    assert present and not any(c.encode() in stored for c in present)
    assert path.stat().st_mode & 0o077 == 0
    # other settings or another key never see these entries
    other = curate.scrubbing_settings(("EMAIL_ADDRESS",), 0.4)
    assert curate.FindingsCache(path, "key-1", other).lookup(list(first._marked)) == {}
    assert curate.FindingsCache(path, "key-2", settings).lookup(list(first._marked)) == {}


def test_findings_no_run_used_for_a_while_are_deleted(tmp_path):
    settings = curate.scrubbing_settings(curate.DEFAULT_ENTITIES, 0.4)
    path = tmp_path / "findings.sqlite"
    cache = curate.FindingsCache(path, "key", settings)
    cache.store({"old text": [], "recent text": [("PERSON", 0, 3, 0.85)]})
    cache._db.execute("UPDATE findings SET used_on = date('now', '-40 days') WHERE findings = '[]'")
    cache._db.commit()
    reopened = curate.FindingsCache(path, "key", settings, max_idle_days=30)
    assert reopened.lookup(["old text", "recent text"]) == {"recent text": [("PERSON", 0, 3, 0.85)]}


# Digit runs that are not personal data, from real tool arguments and prose: epoch timestamps in
# milliseconds (13 digits, many of which pass Luhn), arithmetic, order and tracking numbers.
NOT_CARDS = ['{"_from": 1617176400000, "_to": 1617262800000}', "14000-3920-1000=9080", "order 1234567812345678",
             "tracking 9400111899223344556677", "ref 2019-03-04 12:00:00", "call +1 (555) 01"]
CARDS = ["card 4111 1111 1111 1111", "pay with 5555-5555-5555-4444", "amex 378282246310005", "mc 2223003122003222"]


def test_the_leak_sweep_reports_cards_as_presidio_validates_them_and_not_timestamps_or_arithmetic():
    assert [text for text in NOT_CARDS if curate.leaks_in(text)] == []
    assert all(curate.leaks_in(text) == [curate.CARD_NUMBER] for text in CARDS)


def _pair(trace_id: str, question: str, arguments: dict) -> str:
    return json.dumps({
        "id": trace_id, "created_at": "2026-11-02T10:00:00Z",
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": question}]},
        "response": {"choices": [{"finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "charge", "arguments": json.dumps(arguments)}}]}}]},
    })


def test_a_call_with_what_looks_like_personal_data_after_scrubbing_is_set_aside_with_its_field_and_the_rest_go_on(tmp_path):
    from pipeline import ingest

    landing = tmp_path / "calls.jsonl"
    landing.write_text("\n".join([
        # a card number logged as a JSON number: scrubbing reads strings, the sweep reads numbers too
        _pair("card-as-number", "charge the order", {"card": 4111111111111111, "amount": 12}),
        _pair("timestamps", "list the events of April", {"_from": 1617176400000, "_to": 1617262800000}),
        _pair("arithmetic", "what is 14000-3920-1000?", {"expression": "14000-3920-1000=9080"}),
    ]) + "\n")
    traces = ingest.read_calls([landing]).traces
    result = curate.curate(traces)
    assert sorted(result.curated["trace_id"]) == ["arithmetic", "timestamps"]  # numbers intact
    assert "1617176400000" in result.curated["response_message"].iloc[list(result.curated["trace_id"]).index("timestamps")]
    set_aside = result.removed[result.removed["reason"] == curate.POSSIBLE_PERSONAL_DATA]
    assert list(set_aside["trace_id"]) == ["card-as-number"]
    # where, never what
    assert list(set_aside["where"]) == ["response.tool_calls[0].function.arguments.card: card number"]
    assert "4111" not in set_aside.to_json()
    assert result.counts()["possible_personal_data"] == 1 and result.counts()["unusable"] == 0
    assert result.counts()["curated"] + len(result.removed) == len(traces)
    # the invariant the blocking check guards
    assert curate.sweep_leaks(result.curated) == {}


def test_amounts_and_arithmetic_are_kept_while_phone_numbers_beside_them_are_not():
    """Presidio's phone matcher reads `169.91` of `$2,169.91` as a German number and `11200-10-100`
    as a Delhi one (found by the whole-path fuzz and `bench.curation_bench --harmless-numbers`)."""
    scrubber = curate.Scrubber(processes=1)
    for text in ["total $2,169.91 due", "€1.169,80 per night", "11200-10-100=11090", "3000 - 2920 = 80"]:
        assert scrubber.scrub(text) == text
    assert scrubber.scrub("call 030 901820, price $2,169.91") == "call <PHONE_NUMBER_1>, price $2,169.91"


def test_tool_definitions_lose_addresses_and_keys_but_keep_their_words_and_enums_and_the_counts_say_so():
    tools = [{"type": "function", "function": {"name": "convert", "description": "Convert a temperature to Kelvin. Bugs to ops@example.com.",
                                               "parameters": {"type": "object", "properties": {
                                                   "material": {"type": "string", "enum": ["Bronze", "Marble"]}}}}}]
    calls = pd.DataFrame([{"messages": json.dumps([{"role": "user", "content": "what is 20 degrees in kelvin?"}]),
                           "tools": json.dumps(tools),
                           "response_message": json.dumps({"role": "assistant", "content": "293.15 K"})}])
    scrubber = curate.Scrubber(processes=1)
    scrubbed = json.loads(curate.scrub_calls(calls, scrubber).iloc[0]["tools"])
    function = scrubbed[0]["function"]
    assert function["description"] == "Convert a temperature to Kelvin. Bugs to <EMAIL_ADDRESS_1>."
    assert function["parameters"]["properties"]["material"]["enum"] == ["Bronze", "Marble"]
    assert scrubber.findings.get("EMAIL_ADDRESS") == 1 and not scrubber.findings.get("PERSON")  # only what was replaced
