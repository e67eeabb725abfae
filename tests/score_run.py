"""Score a finished run's outputs against the sample's truth labels (never read by the pipeline).

    .venv/bin/python -m tests.score_run [OUTPUT_DIR [DAGSTER_HOME]]     (default: output/ .dagster_home/)

Prints what the README and the issue notes quote: malformed lines quarantined, canaries left in
anything written after scrubbing and in the Dagster instance's storage, exact and near duplicates caught, distinct calls merged, the
share of gold answers scrubbing left intact, clustering quality (adjusted Rand index and
purity against the true step of each call), and per evaluated cluster the SLM's agreement with
the logged answers and its accuracy against the datasets' gold answers next to the logged
LLM's, on the same held-out test calls, with coverage, decision and the share of all calls the
router would answer with SLMs.
"""

import json
import sys
from pathlib import Path

import pandas as pd
from sklearn.metrics import adjusted_rand_score

from pipeline.calls import parse_tool_calls
from pipeline.promote import latest_run
from pipeline.scoring import _normalize, score_answer
from pipeline.store import Store, read_json, read_table
from pipeline.ingest import find_landing_files, read_calls
from tests.conftest import FIXTURES, LANDING as SAMPLE, REPO


def _gold_strings(gold) -> list[str]:
    """The strings a correct logged answer must contain: the intent list or final number as is,
    each slot value, each tool-call argument value."""
    if isinstance(gold, dict):
        return [str(v) for v in gold.values()]
    if isinstance(gold, list):
        values = []
        for call in gold:
            for arguments in call.values():
                for value in arguments.values():
                    values.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        return values
    return [str(gold)]


def gold_intact(before: pd.DataFrame, after: pd.DataFrame, labels: dict) -> dict:
    """Of the calls whose logged answer held its gold answer before scrubbing, the share that
    still holds it after, overall and per step (a person's name a step must return is lost on
    purpose)."""
    raw_answers = before.set_index("trace_id")["response_message"]
    held, intact = {}, {}
    for trace_id, scrubbed in zip(after["trace_id"], after["response_message"]):
        record = labels["records"][trace_id]
        strings = [s.lower() for s in _gold_strings(record["gold"])]
        if not strings or not all(s in raw_answers[trace_id].lower() for s in strings):
            continue
        step = record["step"]
        held[step] = held.get(step, 0) + 1
        intact[step] = intact.get(step, 0) + all(s in scrubbed.lower() for s in strings)
    per_step = {step: round(intact[step] / held[step], 4) for step in sorted(held)}
    return {"overall": round(sum(intact.values()) / max(sum(held.values()), 1), 4), "by_step": per_step}


def gold_answer_text(gold) -> str:
    """A dataset's gold answer written the way a logged answer is, so the same scorer reads it:
    intents as a label list, slots as a JSON object, a math answer after '####'."""
    if isinstance(gold, dict):
        return json.dumps(gold)
    if isinstance(gold, (int, float)) or str(gold).replace(",", "").replace(".", "", 1).lstrip("-").isdigit():
        return f"#### {gold}"
    return str(gold)


def tool_calls_match_gold(gold: list[dict], answer: str) -> float:
    """BFCL's grading: each gold call names a function and, per argument, the values it accepts
    ("" among them: the argument may be left out); function names with dots are spelled with
    underscores in the OpenAI schemas. The share of calls matched, in any order."""
    predicted = parse_tool_calls(answer) or []
    if not gold:  # the irrelevance set: no function fits, the right answer calls none
        return float(not predicted)
    unused = list(predicted)

    def fits(given: dict, accepted: dict) -> bool:
        """Every key's value among those accepted (nested objects key by key), none extra."""
        return not set(given) - set(accepted) and all(
            any(fits(given[key], option) if isinstance(option, dict) and isinstance(given[key], dict)
                else _normalize(given[key]) == _normalize(option) for option in values)
            if key in given else "" in values
            for key, values in accepted.items())

    def accepts(name: str, accepted: dict, call: dict) -> bool:
        return call.get("name", "").replace(".", "_") == name.replace(".", "_") and fits(call.get("arguments") or {}, accepted)

    matched = 0
    for gold_call in gold:
        (name, accepted), = gold_call.items()
        hit = next((call for call in unused if accepts(name, accepted, call)), None)
        if hit is not None:
            unused.remove(hit)
            matched += 1
    return matched / max(len(gold), len(predicted), 1)


def accuracy_vs_gold(gold, answer: str) -> float:
    return tool_calls_match_gold(gold, answer) if isinstance(gold, list) else score_answer(gold_answer_text(gold), answer)[1]


def evaluation_against_truth(store: Store, labels: dict) -> dict | None:
    """Per evaluated cluster, on its held-out test calls: SLM agreement with the logged answer,
    SLM and logged-LLM accuracy against gold, coverage and decision; and the routed share."""
    predictions_path = store.evaluation / "predictions.parquet"
    if not predictions_path.exists():
        return None
    predictions = read_table(predictions_path)
    summary = read_json(latest_run(store.registry) / "summary.json")
    test = predictions[predictions["split"] == "test"]
    clusters = {}
    for c in summary["clusters"]:
        calls = test[test["cluster_id"] == c["cluster_id"]]
        if calls.empty:
            continue
        # a cluster may have had several kinds of specialist measured: the one reported, and the others apart
        by_kind = dict(tuple(calls.groupby("kind"))) if "kind" in calls.columns else {}
        if by_kind:
            calls = by_kind.pop(c["shadow_eval"]["kind"])
        records = [labels["records"][i] for i in calls["trace_id"]]
        slm_right = [accuracy_vs_gold(r["gold"], a) for r, a in zip(records, calls["slm_answer"])]
        evaluation = c["shadow_eval"]
        clusters[c["name"]] = {
            "true_step": pd.Series([r["step"] for r in records]).mode()[0],
            "test_calls": len(calls),
            "slm_agreement_with_logged_answer": round(float(calls["score"].mean()), 4),
            "slm_accuracy_vs_gold": round(sum(slm_right) / len(slm_right), 4),
            "logged_llm_accuracy_vs_gold": round(sum(r["teacher_ok"] for r in records) / len(records), 4),
            "coverage_at_threshold": evaluation["coverage_at_threshold"],
            "decision": c["promotion"]["decision"],
        }
        for kind, other in by_kind.items():
            gold = [labels["records"][i]["gold"] for i in other["trace_id"]]
            clusters[c["name"]].setdefault("also_measured", {})[kind] = {
                "slm_agreement_with_logged_answer": round(float(other["score"].mean()), 4),
                "slm_accuracy_vs_gold": round(sum(accuracy_vs_gold(g, a) for g, a in zip(gold, other["slm_answer"]))
                                              / len(gold), 4)}
        # on the test calls the route would answer (confidence at or above its threshold), both
        # graded by the same scorer against gold: what the agent gets from the route, against what
        # it got from the LLM on the same calls
        threshold = evaluation["confidence_threshold"]
        answered = calls["confidence"] >= threshold if threshold is not None else calls["confidence"] > 2
        if answered.any():
            gold = [r["gold"] for r, keep in zip(records, answered) if keep]
            clusters[c["name"]]["on_answered_calls"] = {
                "calls": int(answered.sum()),
                "slm_accuracy_vs_gold": round(sum(accuracy_vs_gold(g, a) for g, a in zip(gold, calls["slm_answer"][answered]))
                                              / len(gold), 4),
                "logged_llm_accuracy_vs_gold": round(sum(accuracy_vs_gold(g, a) for g, a in
                                                         zip(gold, calls["baseline_answer"][answered])) / len(gold), 4),
            }
    return {"clusters": clusters, "share_of_calls_to_slms": summary["counts"]["share_of_calls_to_slms"]}


def clustering_quality(assignments: pd.DataFrame, labels: dict) -> dict:
    """Clusters against the true steps: adjusted Rand index (unclustered calls count as one
    group), purity of the clustered calls, share left unclustered."""
    steps = assignments["trace_id"].map(lambda i: labels["records"][i]["step"])
    clustered = assignments["cluster_id"] != -1
    purity = pd.crosstab(assignments.loc[clustered, "cluster_id"], steps[clustered]).max(axis=1).sum() / max(clustered.sum(), 1)
    return {
        "adjusted_rand_index": round(adjusted_rand_score(steps, assignments["cluster_id"]), 4),
        "purity": round(float(purity), 4),
        "unclustered_share": round(float((~clustered).mean()), 4),
    }


def instance_text(dagster_home: Path) -> str:
    """Every event the Dagster instance keeps (logs, materialization and check metadata: examples,
    removal records, check results) of every run, serialized, whatever its storage (SQLite files
    or PostgreSQL)."""
    import dagster as dg
    from dagster_shared.serdes import serialize_value

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    return "\n".join(serialize_value(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id))


def score(output_dir: Path, dagster_home: Path | None = None) -> dict:
    labels = json.loads((FIXTURES / "labels.json").read_text())
    store = Store(output_dir)
    raw_stats = read_json(store.stats("raw_traces"))
    curated = read_table(store.table("curated_traces"))
    removed = read_table(store.table("curation_removed"))
    assignments = read_table(store.table("task_clusters"))

    # everything written after scrubbing: curated table, eval predictions, registry files
    written = [*curated["messages"], *curated["response_message"]]
    predictions = store.evaluation / "predictions.parquet"
    if predictions.exists():
        frame = read_table(predictions)
        written += [*frame.get("baseline_answer", []), *frame.get("slm_answer", [])]
    # every text file written after scrubbing: registry versions, adapters with their model
    # cards and training records, eval reports, stage stats (the raw zone is the only exception)
    written += [
        p.read_text(errors="replace")
        for p in output_dir.rglob("*")
        if p.suffix in {".json", ".yaml", ".md", ".txt", ".jsonl"} and store.raw not in p.parents
    ]
    text = "\n".join(written)
    canaries_left = [c for c in labels["canaries"] if c in text]
    instance = instance_text(dagster_home) if dagster_home else ""
    canaries_in_instance = [c for c in labels["canaries"] if c in instance]

    dropped = set(removed.loc[removed["reason"].isin(["exact duplicate", "near duplicate"]), "trace_id"])
    copies = {kind: {copy for _, copy in labels["dups"][kind]} for kind in ("exact", "near")}
    in_pairs = {trace_id for kind in ("exact", "near") for pair in labels["dups"][kind] for trace_id in pair}
    distinct = set(labels["records"]) - in_pairs
    return {
        "quarantined_non_empty_lines": raw_stats["quarantined"] - raw_stats["quarantine_reasons"].get("empty line", 0),
        "labelled_malformed_lines": labels["malformed_lines"],
        "canaries": len(labels["canaries"]),
        "canaries_left_after_scrubbing": len(canaries_left),
        **({"canaries_left_in_dagster_instance": len(canaries_in_instance)} if dagster_home else {}),
        "exact_duplicates_caught": f"{len(copies['exact'] & dropped)}/{len(copies['exact'])}",
        "near_duplicates_caught": f"{len(copies['near'] & dropped)}/{len(copies['near'])}",
        "distinct_calls_merged": f"{len(dropped & distinct)}/{len(distinct)}",
        "gold_answers_intact_after_scrubbing": gold_intact(read_calls(find_landing_files(SAMPLE)).traces, curated, labels),
        **clustering_quality(assignments, labels),
        "shadow_evaluation": evaluation_against_truth(store, labels),
    }


if __name__ == "__main__":
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "output"
    home = Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / ".dagster_home"
    print(json.dumps(score(output, home if home.is_dir() else None), indent=2))
