"""Step 4, SLM selection: for each cluster, which candidate to fine-tune, or keep it on the LLM.

First version: the features of a cluster's work decide. A cluster with too few calls, or whose
answers are long multi-step reasoning or open-ended text, stays on the LLM; otherwise the
smallest available candidate whose context holds the cluster's calls is chosen. Every decision
carries its reason and the features behind it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cluster import output_statistics
from pipeline.models import Candidate, availability
from pipeline.scoring import FINAL_NUMBER, FREE_TEXT

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
        "reason": (
            f"{features['answer_shape'].replace('_', ' ')} answers of "
            f"{features['mean_completion_tokens']:.0f} tokens on average: the smallest available "
            f"candidate ({chosen.params_millions}M parameters, context {chosen.context_length}) "
            f"holds the p95 call of {features['p95_total_tokens']} tokens"
        ),
    }


def select_models(
    curated: pd.DataFrame,
    assignments: pd.DataFrame,
    clusters: list[dict],
    candidates: list[Candidate],
    model_cache: Path,
    min_calls: int = 40,
    max_mean_completion_tokens: int = 60,
) -> tuple[list[dict], dict[str, str]]:
    """One choice per cluster, and the unavailable candidates with the reason for each."""
    unavailable = {c.name: reason for c in candidates if (reason := availability(c, model_cache))}
    calls = curated.merge(assignments[["trace_id", "cluster_id"]], on="trace_id")
    choices = []
    for cluster in clusters:
        members = calls[calls["cluster_id"] == cluster["cluster_id"]]
        features = cluster_features(members)
        choice = decide(features, candidates, unavailable, min_calls, max_mean_completion_tokens)
        choices.append(
            {"cluster_id": cluster["cluster_id"], "label": cluster["label"], **choice, "features": features}
        )
    return choices, unavailable
