"""Curation benchmark: naive per-message Presidio against the pipeline's scrubbing, same calls.

    python -m bench.curation_bench                  # the bundled sample's calls, both ways (~3 min)
    python -m bench.curation_bench --naive-calls 400  # naive on the first 400 only (quicker)
    python -m bench.curation_bench --breakdown        # where one core's analysis time goes
    python -m bench.curation_bench --naive-calls 400 --compare-presidio-phone  # also the pipeline with Presidio's phone recognizer
    python -m bench.curation_bench --harmless-numbers  # the sample with numbers no one's personal data added (~2 min)

Naive: every text of every call (message contents, tool-call arguments, the answer) goes through
`AnalyzerEngine.analyze` one at a time on spaCy's full pipeline, as a first implementation would
do. Pipeline: the `curate.scrub_calls` the `curated_traces` asset runs (each distinct text
analyzed once, batched `nlp.pipe`, only the spaCy components Presidio reads, spaCy's NER run one
numpy step per token position, a phone recognizer that skips digit groups too short to be a
number, all cores). Both use the same recognizers and
entity types; the benchmark checks that they remove exactly the same canaries of the sample's truth labels,
then reports calls/s for each and the ratio. Naive runs on all the calls, or on the first
`--naive-calls` (it is slow); its rate is per call, so the two rates compare.

Nightly rerun: the schedule re-curates the whole raw zone every night. With the findings cache
(`curate.FindingsCache`) filled by the night before (every day but the last), the rerun over all
the calls analyzes only the last day's new texts; its time is reported as well, apart from the
single-run figure above. Results are appended to bench/results/curation.jsonl with the machine,
date and command.

`--harmless-numbers` curates the sample's calls with numbers that are no one's personal data
written into half of them, the shapes that halted a run on another workload: an epoch timestamp
in milliseconds as a tool-call argument (`"_from": 1617176400000`), a planner's arithmetic
(`14000-3920-1000=9080`), an order number and an amount in the request. It reports the calls the
leak sweep set aside (and the share; the target is below 0.1%), the harmless numbers that did not
come through intact, and the sample's canaries left.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench import results

REPO = Path(__file__).resolve().parents[1]


def naive_scrub(traces, entities) -> tuple[list[str], float]:
    """Per-message analyze + anonymize, no cache, no batching; returns (scrubbed texts, seconds)."""
    from pipeline import curate

    analyzer, anonymizer = curate.build_analyzer(tuned=False), curate._anonymizer()
    started = time.perf_counter()
    out = []
    for messages_json, response_json in zip(traces["messages"], traces["response_message"]):
        for text in curate.texts_of_call(json.loads(messages_json), json.loads(response_json)):
            found = analyzer.analyze(text=text, language="en", entities=list(entities), score_threshold=0.4)
            out.append(anonymizer.anonymize(text=text, analyzer_results=found).text if found else text)
    return out, time.perf_counter() - started


def breakdown(traces) -> dict:
    """Where one core's time goes in the pipeline's analysis of the distinct texts: spaCy with
    the NER (texts with a capital letter), spaCy without it (the others), the NER alone both ways
    (spaCy's compiled loop and the pipeline's stepwise run, with whether they found the same
    entities), the NER's move selection both ways (spaCy's and the stepwise one's, same scores),
    the phone recognizer (the pipeline's, and Presidio's own as it comes, on the same
    texts), and the other recognizers."""
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    from pipeline import curate

    analyzer = curate.build_analyzer()
    engine, nlp = analyzer.nlp_engine, analyzer.nlp_engine.nlp["en"]
    texts = sorted({t for m, r in zip(traces["messages"], traces["response_message"])
                    for t in curate.texts_of_call(json.loads(m), json.loads(r)) if t})
    with_ner = [t for t in texts if any(c.isupper() for c in t)]
    without_ner = [t for t in texts if not any(c.isupper() for c in t)]
    started = time.perf_counter()
    artifacts = dict(engine.process_batch(with_ner, language="en", batch_size=256))
    ner_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with nlp.select_pipes(disable=[name for name in curate.NER_PIPES if name in nlp.pipe_names]):
        artifacts.update(engine.process_batch(without_ner, language="en", batch_size=256))
    tokenize_seconds = time.perf_counter() - started

    def recognizers(entities) -> float:
        started = time.perf_counter()
        for text in texts:
            analyzer.analyze(text=text, language="en", entities=entities, score_threshold=0.4, nlp_artifacts=artifacts[text])
        return time.perf_counter() - started

    def phone_numbers(recognizer) -> float:
        started = time.perf_counter()
        for text in texts:
            recognizer.analyze(text, ["PHONE_NUMBER"], artifacts[text])
        return time.perf_counter() - started

    def entities(component) -> tuple[list, float]:
        docs = [nlp.make_doc(t) for t in with_ner]
        started = time.perf_counter()
        found = [[(e.start_char, e.end_char, e.label_) for e in doc.ents] for doc in component.pipe(docs, batch_size=256)]
        return found, time.perf_counter() - started

    def move_selection() -> dict:
        """spaCy's `transition_states` against the stepwise NER's `_apply_best_moves` on the same
        scores, step by step (the states of both are compared at every step, untimed), and how
        many states' best-scoring move was invalid (those spaCy checks the whole way)."""
        ner, stepwise = nlp.get_pipe("ner"), nlp.get_pipe("stepwise_ner")
        docs = [nlp.make_doc(t) for t in with_ner]
        spacys_seconds = pipelines_seconds = 0.0
        state_steps = checked_by_spacy = 0
        same_moves = True
        for start in range(0, len(docs), 256):
            batch = docs[start : start + 256]
            model = ner.model.predict(batch)
            spacys, pipelines = ([s for s in ner.moves.init_batch(batch) if not s.is_final()] for _ in range(2))
            while spacys:
                scores = model.predict(spacys)
                state_steps += len(spacys)
                checked_by_spacy += sum(not ner.moves.is_valid(state, stepwise.move_names[best])
                                        for state, best in zip(pipelines, scores.argmax(axis=1)))
                started = time.perf_counter()
                spacys = ner.transition_states(spacys, scores)
                spacys_seconds += time.perf_counter() - started
                started = time.perf_counter()
                pipelines = stepwise._apply_best_moves(pipelines, scores)
                pipelines_seconds += time.perf_counter() - started
                same_moves &= [(s.queue, s.stack, s.entity_is_open()) for s in spacys] == \
                              [(s.queue, s.stack, s.entity_is_open()) for s in pipelines]
            model.clear_memory()
        return {"move_selection_spacys_seconds": round(spacys_seconds, 2),
                "move_selection_stepwise_seconds": round(pipelines_seconds, 2),
                "move_selection_same_moves": same_moves,
                "move_selection_state_steps": state_steps,
                "move_selection_checked_by_spacy": checked_by_spacy}

    spacys, spacys_seconds = entities(nlp.get_pipe("ner"))
    stepwise, stepwise_seconds = entities(nlp.get_pipe("stepwise_ner"))
    pipeline_phone = next(r for r in analyzer.registry.recognizers if r.name == "PhoneRecognizer")
    without_phone = recognizers([e for e in curate.DEFAULT_ENTITIES if e != "PHONE_NUMBER"])
    return {
        "distinct_texts": len(texts),
        "texts_with_ner": len(with_ner),
        "spacy_with_ner_seconds": round(ner_seconds, 1),
        "spacy_without_ner_seconds": round(tokenize_seconds, 1),
        "ner_alone_spacys_loop_seconds": round(spacys_seconds, 1),
        "ner_alone_stepwise_seconds": round(stepwise_seconds, 1),
        "ner_alone_same_entities": stepwise == spacys,
        "entities_found": sum(map(len, spacys)),
        **move_selection(),
        "phone_recognizer_seconds": round(phone_numbers(pipeline_phone), 1),
        "presidio_phone_recognizer_seconds": round(phone_numbers(PhoneRecognizer()), 1),
        "other_recognizers_seconds": round(without_phone, 1),
    }


def compare_presidio_phone(traces, scrubbed, processes: int) -> dict:
    """The pipeline's cold run again, with Presidio's phone recognizer in place of the pipeline's
    (which skips digit groups too short to be a number): its seconds, and whether it scrubbed
    the same."""
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    from pipeline import curate

    registry = curate.build_analyzer().registry
    pipeline_phone = next(r for r in registry.recognizers if r.name == "PhoneRecognizer")
    registry.remove_recognizer("PhoneRecognizer")
    registry.add_recognizer(PhoneRecognizer())
    try:
        started = time.perf_counter()
        with_presidio_phone = curate.scrub_calls(traces, curate.Scrubber(processes=processes))
        seconds = time.perf_counter() - started
    finally:
        registry.remove_recognizer("PhoneRecognizer")
        registry.add_recognizer(pipeline_phone)
    return {"pipeline_with_presidio_phone_seconds": round(seconds, 1),
            "pipeline_with_presidio_phone_same_output": with_presidio_phone.equals(scrubbed)}


def with_harmless_numbers(traces, seed: int = 0):
    """Half of the calls with harmless numbers added; (calls, {trace id: the numbers added})."""
    import random

    rng = random.Random(seed)
    added: dict[str, list[str]] = {}
    messages, responses = [], []
    for trace_id, raw_messages, raw_response in zip(traces["trace_id"], traces["messages"], traces["response_message"]):
        chat, answer = json.loads(raw_messages), json.loads(raw_response)
        if rng.random() < 0.5:
            stamp = rng.randint(1_500_000_000_000, 1_900_000_000_000)
            a = rng.randint(1_000, 99_999)
            b, c = rng.randint(10, a // 2), rng.randint(10, a // 2)
            order, amount = str(rng.randint(10_000_000, 99_999_999)), f"${rng.randint(1, 9_999):,}.{rng.randint(0, 99):02d}"
            arithmetic = f"{a}-{b}-{c}={a - b - c}"
            user = next(m for m in reversed(chat) if m.get("role") == "user")
            if isinstance(user.get("content"), str):
                user["content"] += f" (order {order}, {amount}, check: {arithmetic})"
            numbers = [order, amount, arithmetic] if isinstance(user.get("content"), str) else []
            for call in answer.get("tool_calls") or []:
                arguments = json.loads(call["function"]["arguments"] or "{}")
                if isinstance(arguments, dict):
                    call["function"]["arguments"] = json.dumps({**arguments, "_from": stamp})
                    numbers.append(str(stamp))
            added[trace_id] = numbers
        messages.append(json.dumps(chat))
        responses.append(json.dumps(answer))
    return traces.assign(messages=messages, response_message=responses), added


def harmless_numbers(traces, labels: dict) -> dict:
    from pipeline import curate

    calls, added = with_harmless_numbers(traces)
    started = time.perf_counter()
    result = curate.curate(calls)
    seconds = time.perf_counter() - started
    curated = result.curated.set_index("trace_id")
    text = dict(zip(curated.index, curated["messages"] + curated["response_message"]))
    damaged = {i: [n for n in numbers if n not in text[i]] for i, numbers in added.items() if i in text}
    set_aside = result.removed[result.removed["reason"] == curate.POSSIBLE_PERSONAL_DATA]
    everything = "\n".join(text.values())
    return {
        "workload": "the sample's calls, half with an epoch-ms tool argument, an order number, an amount and arithmetic added",
        "calls": len(calls),
        "calls_with_numbers_added": len(added),
        "numbers_added": sum(map(len, added.values())),
        "numbers_not_intact": sum(map(len, damaged.values())),
        "not_intact_examples": [n for found in damaged.values() for n in found][:10],
        "set_aside_possible_personal_data": len(set_aside),
        "set_aside_share": round(len(set_aside) / len(calls), 5),
        "set_aside_where": dict(zip(set_aside["trace_id"], set_aside["where"])),
        "canaries_left": sum(c in everything for c in labels["canaries"]),
        "blocking_check_would_pass": curate.sweep_leaks(result.curated) == {},
        "curation_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--naive-calls", type=int, default=0, help="calls the naive way runs on (default: all; it is slow)")
    parser.add_argument("--processes", type=int, default=0, help="worker processes of the pipeline (default: one per core)")
    parser.add_argument("--breakdown", action="store_true", help="only time the parts of the analysis, on one core")
    parser.add_argument("--compare-presidio-phone", action="store_true",
                        help="also time the pipeline with Presidio's phone recognizer as it comes, same process")
    parser.add_argument("--harmless-numbers", action="store_true", help="the sample with harmless numbers added: what the sweep sets aside")
    args = parser.parse_args()

    from pipeline import curate, ingest

    labels = json.loads((REPO / "tests" / "fixtures" / "labels.json").read_text())
    traces = ingest.read_calls(ingest.find_landing_files(REPO / "data" / "landing")).traces
    if args.harmless_numbers:
        results.record("curation", harmless_numbers(traces, labels))
        return
    if args.breakdown:
        results.record("curation_breakdown", breakdown(traces))
        return
    curate.build_analyzer(), curate.build_analyzer(tuned=False)  # both start with models loaded

    scrubber = curate.Scrubber(processes=args.processes)
    started = time.perf_counter()
    scrubbed = curate.scrub_calls(traces, scrubber)
    pipeline_seconds = time.perf_counter() - started
    compared = compare_presidio_phone(traces, scrubbed, args.processes) if args.compare_presidio_phone else {}

    naive_calls = args.naive_calls or len(traces)
    # the nightly rerun: yesterday's run filled the cache with every day but the last
    last_day = traces["called_at"].dt.date.max()
    with tempfile.TemporaryDirectory() as cache_dir:
        settings = curate.scrubbing_settings(curate.DEFAULT_ENTITIES, 0.4)
        cache = curate.FindingsCache(Path(cache_dir) / "findings.sqlite", "benchmark-key", settings)
        curate.scrub_calls(traces[traces["called_at"].dt.date < last_day], curate.Scrubber(cache=cache))
        nightly = curate.Scrubber(cache=cache)
        started = time.perf_counter()
        rescrubbed = curate.scrub_calls(traces, nightly)
        nightly_seconds = time.perf_counter() - started
    assert rescrubbed.equals(scrubbed), "the rerun with the cache must scrub exactly as the cold run"

    subset = traces.iloc[:naive_calls]
    naive_texts, naive_seconds = naive_scrub(subset, curate.DEFAULT_ENTITIES)

    raw_text = "\n".join([*subset["messages"], *subset["response_message"]])
    present = [c for c in labels["canaries"] if c in raw_text]
    naive_text = "\n".join(naive_texts)
    pipeline_text = "\n".join([*scrubbed["messages"].iloc[:naive_calls], *scrubbed["response_message"].iloc[:naive_calls]])
    naive_missed = sorted(c for c in present if c in naive_text)
    pipeline_missed = sorted(c for c in present if c in pipeline_text)

    results.record("curation", {
        "pipeline_processes": args.processes or min(os.cpu_count() or 1, 8),
        "pipeline_calls": len(traces),
        "pipeline_seconds": round(pipeline_seconds, 1),
        "pipeline_calls_per_second": round(len(traces) / pipeline_seconds, 1),
        "naive_calls": len(subset),
        "naive_seconds": round(naive_seconds, 1),
        "naive_calls_per_second": round(len(subset) / naive_seconds, 1),
        "speedup": round((len(traces) / pipeline_seconds) / (len(subset) / naive_seconds), 1),
        "nightly_rerun_seconds": round(nightly_seconds, 1),
        "nightly_rerun_texts_analyzed": len(nightly._marked) - nightly.reused,
        "nightly_rerun_texts_reused": nightly.reused,
        "nightly_rerun_speedup": round((len(traces) / nightly_seconds) / (len(subset) / naive_seconds), 1),
        "canaries_in_naive_subset": len(present),
        "canaries_missed_naive": len(naive_missed),
        "canaries_missed_pipeline": len(pipeline_missed),
        "same_canaries_found": naive_missed == pipeline_missed,
        **compared,
    })


if __name__ == "__main__":
    main()
