"""Step 4, SLM selection: for each cluster, which candidate to fine-tune, or keep it on the LLM.

The features of a cluster's work give a first ranking: a cluster with too few calls, or whose
answers are long multi-step reasoning or open-ended text, stays on the LLM; otherwise the
available candidates whose context holds the cluster's calls qualify, smallest first. Then a
measured probe (`ProbeSettings`): each qualifying candidate answers a few of the cluster's calls
zero-shot and few-shot, scored with the shadow evaluation's scorers, and the smallest candidate
within `margin` of the best few-shot score is chosen (fine-tuning then lifts each candidate
from where it starts, so a larger one is worth its cost only when it starts clearly higher).
Clusters kept on the LLM are probed too, with the smallest candidate, as evidence. Every
decision carries its reason, the features and the probe scores behind it.

Before any of that, the cluster's answers are read for a contract an encoder can keep
(`pipeline.encoders.answer_contract`): label sets from a closed list get a classifier, JSON
objects of spans copied from the request a span tagger. Such a specialist (22M parameters, a
forward pass per call) is the cheapest to train and to serve, so it is chosen wherever the
contract allows and `kinds` enables it; tool calls, reasoning and free text need a generator,
and for them two kinds are measured where `kinds` enables both (`kinds_measured`): a LoRA
adapter on the chosen SLM, and the same SLM without training shown retrieved solved calls
(`pipeline.incontext`); promotion keeps the cheaper one that passes the gate. `measure_every_kind`
measures the generator kinds beside an encoder specialist too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline import encoders, evaluate
from pipeline.calls import baseline_answer, few_shot_prompt, renders_tools
from pipeline.cluster import output_statistics
from pipeline.models import Candidate, availability, resolve_model_dir
from pipeline.scoring import FINAL_NUMBER, FREE_TEXT
from pipeline.structured import answer_format

FINE_TUNE, KEEP_ON_LLM = "fine-tune", "keep on LLM"


def cluster_features(calls: pd.DataFrame) -> dict:
    """What a cluster's work looks like: volume, sizes, answer shape and diversity."""
    outputs = output_statistics(list(calls["response_message"]))
    prompt_tokens = calls["prompt_tokens"].dropna()
    completion_tokens = calls["completion_tokens"].dropna()
    total = calls["total_tokens"].dropna()
    return {
        "calls": int(len(calls)),
        "answer_shape": outputs["answer_shape"],
        "answer_shapes": outputs["answer_shapes"],
        "mean_prompt_tokens": round(float(prompt_tokens.mean()), 1) if len(prompt_tokens) else None,
        "mean_completion_tokens": round(float(completion_tokens.mean()), 1) if len(completion_tokens) else None,
        "p95_total_tokens": int(np.percentile(total, 95)) if len(total) else None,
        "distinct_answer_share": outputs["distinct_answer_share"],
    }


def decide(
    features: dict,
    candidates: list[Candidate],
    unavailable: dict[str, str],
    min_calls: int,
    max_mean_completion_tokens: int,
) -> dict:
    """The choice for one cluster: {decision, candidate, reason}."""
    if features["calls"] < min_calls:
        return {
            "decision": KEEP_ON_LLM,
            "candidate": None,
            "reason": f"{features['calls']} calls, fewer than the {min_calls} needed to train and judge an SLM",
        }
    long_answers = (features["mean_completion_tokens"] or 0) > max_mean_completion_tokens
    if features["answer_shape"] in (FINAL_NUMBER, FREE_TEXT) and long_answers:
        return {
            "decision": KEEP_ON_LLM,
            "candidate": None,
            "reason": (
                f"answers are {features['answer_shape'].replace('_', ' ')} averaging "
                f"{features['mean_completion_tokens']:.0f} tokens (> {max_mean_completion_tokens}): "
                "multi-step reasoning or open-ended generation that a small model is not expected to match"
            ),
        }
    needed = int((features["p95_total_tokens"] or 0) * 1.2)
    fitting = [
        c for c in sorted(candidates, key=lambda c: c.params_millions)
        if c.name not in unavailable and c.context_length >= needed
    ]
    if not fitting:
        return {
            "decision": KEEP_ON_LLM,
            "candidate": None,
            "reason": f"no available candidate has a context of {needed} tokens",
        }
    chosen = fitting[0]
    return {
        "decision": FINE_TUNE,
        "candidate": chosen.name,
        "ranking": fitting,  # the qualifying candidates, smallest first (for the probe)
        "reason": (
            f"{features['answer_shape'].replace('_', ' ')} answers of "
            f"{features['mean_completion_tokens']:.0f} tokens on average: the smallest available "
            f"candidate ({chosen.params_millions}M parameters, context {chosen.context_length}) "
            f"holds the p95 call of {features['p95_total_tokens']} tokens"
        ),
    }


@dataclass
class ProbeSettings:
    # small by default, so that a CPU run stays within minutes (configs/gpu.yaml probes more)
    calls: int = 8  # calls of a cluster each candidate answers
    shots: int = 2  # solved calls shown in the few-shot prompt
    margin: float = 0.1  # a larger candidate is chosen only if its few-shot score is higher by more
    max_new_tokens_cap: int = 64
    batch_size: int = 8
    structured_decoding: bool = True  # answers decoded in the shape of the cluster's (`pipeline.structured`)


def probe_calls(members: pd.DataFrame, settings: ProbeSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(shots, probe): the cluster's earliest calls, never the latest ones that shadow evaluation
    holds out (at most half the cluster)."""
    ordered = members.sort_values(["called_at", "trace_id"], kind="stable")
    ordered = ordered.iloc[: max(len(ordered) // 2, 1)]
    return ordered.iloc[: settings.shots], ordered.iloc[settings.shots : settings.shots + settings.calls]


def probe(model, tokenizer, members: pd.DataFrame, settings: ProbeSettings) -> dict:
    """Mean score of the model's zero-shot and few-shot answers on a few of the cluster's calls."""
    shots, calls = probe_calls(members, settings)
    if calls.empty:
        return {"calls": 0, "zero_shot": None, "few_shot": None}
    native_tools = renders_tools(tokenizer)
    prompts = evaluate.prompts_of(calls, native_tools)
    examples = evaluate.solved_examples(shots, native_tools)
    budget = evaluate.answer_token_budget(tokenizer, [baseline_answer(r) for r in calls["response_message"]],
                                          settings.max_new_tokens_cap)
    # the shape of the answers in the cluster's earlier half (never held out), the probe calls' own left out
    earlier = members.sort_values(["called_at", "trace_id"], kind="stable").iloc[: max(len(members) // 2, 1)]
    found = answer_format([baseline_answer(r) for r in earlier[~earlier["trace_id"].isin(calls["trace_id"])]["response_message"]]
                          if settings.structured_decoding else [], native_tools)
    grammars = evaluate.call_grammars(model, tokenizer, found, calls)
    return {
        "calls": len(calls),
        "answer_format": found["shape"],
        "zero_shot": evaluate.mean_score(model, tokenizer, prompts, calls, budget, settings.batch_size, grammars),
        "few_shot": evaluate.mean_score(model, tokenizer, [few_shot_prompt(p, examples) for p in prompts], calls,
                                        budget, settings.batch_size, grammars),
    }


def choose_by_probe(ranking: list[Candidate], probes: dict[str, dict], margin: float) -> Candidate:
    """The smallest candidate whose few-shot score is within `margin` of the best one."""
    scored = [c for c in ranking if probes.get(c.name, {}).get("few_shot") is not None]
    if not scored:
        return ranking[0]
    best = max(probes[c.name]["few_shot"] for c in scored)
    return next(c for c in scored if probes[c.name]["few_shot"] >= best - margin)


def probe_key(candidate: Candidate, members: pd.DataFrame, settings: ProbeSettings) -> str:
    """Same candidate, same probe calls, same settings: same scores (generation is greedy)."""
    shots, calls = probe_calls(members, settings)
    what = [candidate.name, asdict(settings), sorted(shots["trace_id"]), sorted(calls["trace_id"])]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:20]


def run_probes(
    calls: pd.DataFrame, plan: dict[int, list[Candidate]], model_cache: Path, settings: ProbeSettings,
    progress: Callable[[str], None] | None = None, known: dict[str, dict] | None = None,
) -> dict[int, dict[str, dict]]:
    """cluster -> candidate name -> probe scores; each candidate is loaded once, and only when a
    cluster's probe is not in `known` (earlier runs' results by `probe_key`; new ones are added):
    the probe calls are a cluster's earliest, so night after night they rarely change."""
    known = {} if known is None else known
    todo: dict[str, tuple[Candidate, list[tuple[int, pd.DataFrame, str]]]] = {}
    results: dict[int, dict[str, dict]] = {cluster_id: {} for cluster_id in plan}
    for cluster_id, candidates in plan.items():
        members = calls[calls["cluster_id"] == cluster_id]
        for candidate in candidates:
            key = probe_key(candidate, members, settings)
            if key in known:
                results[cluster_id][candidate.name] = known[key]
            else:
                todo.setdefault(candidate.name, (candidate, []))[1].append((cluster_id, members, key))
    for candidate, work in todo.values():
        model, tokenizer = evaluate.load_adapter_model(resolve_model_dir(candidate, model_cache), None)
        for cluster_id, members, key in work:
            known[key] = probe(model, tokenizer, members, settings)
            results[cluster_id][candidate.name] = known[key]
            if progress:
                progress(f"probe {candidate.name} on cluster {cluster_id}: {known[key]}")
        del model
    return results


ENCODER_REASONS = {
    encoders.CLASSIFIER: "every answer is a set of labels from a closed list of {n}: a classifier over the request "
                         "gives it, the smallest specialist that fits the step's contract",
    encoders.SPAN_TAGGER: "every answer is a JSON object of {n} keys whose values are copied from the request: a span "
                          "tagger over the request gives it, the smallest specialist that fits the step's contract",
}


def choose_kind(features: dict, contract: dict, kinds: tuple[str, ...], min_calls: int,
                generative_choice: dict, measure_every_kind: bool = False) -> dict:
    """The specialist kind for one cluster, and the kinds to measure (`kinds_measured`, the
    primary first): an encoder specialist where the answers' contract allows one and `kinds`
    enables it (cheapest to train and serve), else the generative choice (`decide`) as each
    enabled generator kind (a LoRA adapter, the base SLM with retrieved examples); all measured
    by shadow evaluation and the cheapest that passes promoted. With `measure_every_kind` a step
    an encoder can answer is measured with the generator kinds too, in case its encoder fails the
    gate. `generator`: the SLM the generator kinds use (the probe may change it)."""
    generators = ([k for k in encoders.GENERATOR_KINDS if k in kinds]
                  if generative_choice["decision"] == FINE_TUNE else [])
    kind = contract["kind"]
    if kind in encoders.ENCODER_KINDS and kind in kinds and features["calls"] >= min_calls:
        size = len(contract.get("labels") or contract.get("keys") or [])
        also = generators if measure_every_kind else []
        return {"decision": FINE_TUNE, "kind": kind, "kinds_measured": [kind, *also],
                "candidate": encoders.ENCODER_NAME, "generator": generative_choice.get("candidate") if also else None,
                "ranking": generative_choice.get("ranking", []) if also else [],
                "reason": ENCODER_REASONS[kind].format(n=size) + f" ({contract['share']:.0%} of the logged answers)"
                          + (f"; measured beside it: {', '.join(also)}" if also else "")}
    if generative_choice["decision"] != FINE_TUNE:
        return {**generative_choice, "kind": None, "kinds_measured": [], "generator": None}
    if not generators:
        return {"decision": KEEP_ON_LLM, "candidate": None, "kind": None, "kinds_measured": [], "generator": None,
                "reason": "a generative SLM would be needed, and specialist_kinds includes neither generative nor in_context"}
    return {**generative_choice, "kind": generators[0], "kinds_measured": generators,
            "generator": generative_choice["candidate"]}


def select_models(
    curated: pd.DataFrame,
    assignments: pd.DataFrame,
    clusters: list[dict],
    candidates: list[Candidate],
    model_cache: Path,
    min_calls: int = 40,
    max_mean_completion_tokens: int = 60,
    probe_settings: ProbeSettings | None = None,
    progress: Callable[[str], None] | None = None,
    known_probes: dict[str, dict] | None = None,
    kinds: tuple[str, ...] = encoders.KINDS,
    measure_every_kind: bool = False,
) -> tuple[list[dict], dict[str, str]]:
    """One choice per cluster, and the unavailable candidates with the reason for each.

    `kinds`: the specialist kinds a cluster may get (encoders.KINDS); `measure_every_kind`: see
    `choose_kind`. `probe_settings=None`
    decides on the features alone (no model is loaded); `known_probes` holds earlier runs' probe
    results (see `run_probes`) and receives this run's."""
    unavailable = {c.name: reason for c in candidates if (reason := availability(c, model_cache))}
    available = sorted((c for c in candidates if c.name not in unavailable), key=lambda c: c.params_millions)
    calls = curated.merge(assignments[["trace_id", "cluster_id"]], on="trace_id")
    choices = []
    for cluster in clusters:
        members = calls[calls["cluster_id"] == cluster["cluster_id"]]
        features = cluster_features(members)
        contract = encoders.answer_contract(members)
        choice = choose_kind(features, contract, tuple(kinds), min_calls,
                             decide(features, candidates, unavailable, min_calls, max_mean_completion_tokens),
                             measure_every_kind)
        choices.append({"cluster_id": cluster["cluster_id"], "label": cluster["label"], **choice,
                        "contract": contract, "features": features})
    rankings = {choice["cluster_id"]: choice.pop("ranking", []) for choice in choices}
    if probe_settings is None or not available:
        return choices, unavailable

    # what to probe: every qualifying candidate of a cluster to fine-tune as a generative SLM; the
    # smallest available one on a cluster kept on the LLM with calls enough (evidence for the
    # decision). Encoder specialists are measured by shadow evaluation, on every held-out call.
    plan = {}
    for choice in choices:
        if choice["decision"] == FINE_TUNE and not choice["generator"]:  # encoder specialists alone
            continue
        if choice["decision"] == FINE_TUNE:
            plan[choice["cluster_id"]] = rankings[choice["cluster_id"]]
        elif choice["features"]["calls"] >= min_calls:
            plan[choice["cluster_id"]] = available[:1]
    probes = run_probes(calls, plan, model_cache, probe_settings, progress, known_probes)
    for choice in choices:
        if choice["cluster_id"] not in probes:
            continue
        choice["probe"] = probes[choice["cluster_id"]]
        evidence = "; ".join(
            f"{name} zero-shot {p['zero_shot']}, few-shot {p['few_shot']} on {p['calls']} calls" for name, p in choice["probe"].items()
        )
        if choice["decision"] == FINE_TUNE:
            ranking = [c for c in available if c.name in choice["probe"]]
            choice["generator"] = choose_by_probe(ranking, choice["probe"], probe_settings.margin).name
            if choice["kind"] in encoders.GENERATOR_KINDS:
                choice["candidate"] = choice["generator"]
        choice["reason"] += f"; probe: {evidence}"
    return choices, unavailable
