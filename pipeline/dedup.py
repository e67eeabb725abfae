"""Duplicate calls: exact (same content hash) and near (MinHash LSH), keeping the earliest.

An agent re-sends calls (retries, replays) and users repeat themselves with other case,
spacing or a word changed; kept in, such calls weigh a task's training data toward a few
examples and leak between training and held-out sets. Every removed call names the call it
duplicates, so duplicate groups can be inspected.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import pandas as pd

from pipeline import calls

# Near duplicates: word 3-grams of the normalized varying part of a call, MinHash with 128
# permutations, LSH candidates confirmed by their exact Jaccard similarity.
SHINGLE_WORDS = 3
NUM_PERM = 128
NEAR_THRESHOLD = 0.9
_PUNCTUATION = re.compile(r"[^\w\s]+")
_WHITESPACE = re.compile(r"\s+")


def content_hash(messages_json: str, tools_json: str | None, response_json: str) -> str:
    """Hash of what a call asked and answered, independent of its id, time and key order."""
    canonical = json.dumps(
        [
            json.loads(messages_json),
            json.loads(tools_json) if isinstance(tools_json, str) else None,
            json.loads(response_json),
        ],
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def normalize(text: str) -> str:
    """Case, spacing and punctuation do not make a call different."""
    return _WHITESPACE.sub(" ", _PUNCTUATION.sub(" ", text.casefold())).strip()


def step_key(messages_json: str, tools_json: str | None) -> str:
    """The step a call belongs to, as its system prompt and tools say: near duplicates are
    looked for among the calls of one step only, since the same words sent to another step are
    another request."""
    system = [m.get("content") for m in json.loads(messages_json) if m.get("role") == "system"]
    return hashlib.sha256(json.dumps([system, tools_json], ensure_ascii=False).encode("utf-8")).hexdigest()


def varying_text(messages_json: str, response_json: str) -> str:
    """What differs between calls of one step: every message but the system prompt (shared by
    all calls of a step, it would make them all look alike), and the answer."""
    messages = json.loads(messages_json)
    parts = [calls.render_answer(m) if m.get("role") == "assistant" else calls.content_text(m.get("content"))
             for m in messages if m.get("role") != "system"]
    parts.append(calls.baseline_answer(response_json))
    return normalize("\n".join(parts))


def shingles(text: str) -> set[str]:
    words = text.split()
    if len(words) <= SHINGLE_WORDS:
        return {text}
    return {" ".join(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


@dataclass
class Duplicates:
    kept: pd.DataFrame  # the calls kept, with a `content_hash` column
    removed: pd.DataFrame  # trace_id, reason ("exact duplicate" / "near duplicate"), duplicate_of, similarity


def find_duplicates(traces: pd.DataFrame, near_threshold: float = NEAR_THRESHOLD) -> Duplicates:
    """Drop exact duplicates, then near duplicates, keeping the earliest call of each group."""
    from datasketch import MinHash, MinHashLSH

    ordered = traces.assign(
        content_hash=[
            content_hash(m, t, r) for m, t, r in zip(traces["messages"], traces["tools"], traces["response_message"])
        ]
    ).sort_values(["called_at", "trace_id"], kind="stable")
    first_id = ordered.groupby("content_hash")["trace_id"].transform("first")
    is_exact = ordered["trace_id"] != first_id
    removed = [
        {"trace_id": t, "reason": "exact duplicate", "duplicate_of": f, "similarity": 1.0}
        for t, f in zip(ordered.loc[is_exact, "trace_id"], first_id[is_exact])
    ]
    unique = ordered[~is_exact]

    # Near duplicates, in time order: each call is compared with the earlier calls of its step
    # kept so far. LSH proposes candidates (at a lower threshold), their exact Jaccard decides.
    indexes: dict[str, MinHashLSH] = {}
    # the band layout depends only on the threshold: work it out once, not once per step
    template = MinHashLSH(threshold=near_threshold * 0.9, num_perm=NUM_PERM)
    lsh_params = (template.b, template.r)
    kept_shingles: dict[str, set[str]] = {}
    is_near = []
    for trace_id, messages_json, tools_json, response_json in zip(
        unique["trace_id"], unique["messages"], unique["tools"], unique["response_message"]
    ):
        step = step_key(messages_json, tools_json)
        if step not in indexes:
            indexes[step] = MinHashLSH(threshold=near_threshold * 0.9, num_perm=NUM_PERM, params=lsh_params)
        lsh = indexes[step]
        grams = shingles(varying_text(messages_json, response_json))
        signature = MinHash(num_perm=NUM_PERM)
        signature.update_batch([g.encode("utf-8") for g in grams])
        best, best_similarity = None, 0.0
        for candidate in lsh.query(signature):
            other = kept_shingles[candidate]
            similarity = len(grams & other) / len(grams | other)
            if similarity >= near_threshold and (similarity, candidate) > (best_similarity, best or ""):
                best, best_similarity = candidate, similarity
        if best is not None:
            removed.append({"trace_id": trace_id, "reason": "near duplicate", "duplicate_of": best, "similarity": round(best_similarity, 4)})
            is_near.append(True)
            continue
        lsh.insert(trace_id, signature)
        kept_shingles[trace_id] = grams
        is_near.append(False)
    kept = unique[[not near for near in is_near]].reset_index(drop=True)
    return Duplicates(kept=kept, removed=pd.DataFrame(removed, columns=["trace_id", "reason", "duplicate_of", "similarity"]))
