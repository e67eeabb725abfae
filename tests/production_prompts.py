"""Calls written the way production agents write prompts, built from the bundled sample.

The sample's steps each have their own short system prompt. Production agents start every step's
system prompt with one long agent preamble (policies, tone, compliance) and the call's filled-in
variables (date, guest, loyalty tier, retrieved policy excerpts), and end it with the step's own
instruction; some calls carry earlier turns of the conversation; and two steps may read the same
kind of message with different label sets. This module rewrites the sample's calls that way so
that clustering can be measured on such prompts (tests/test_cluster.py, bench/cluster_bench.py
`--production`):

    steps                 classify_intent, extract_slots, call_tool, solve_math (the sample's), and
                          triage_urgency: the intent calls' messages under another label set
    preamble              `preamble_tokens` (about 1.3 tokens a word) of policy text, the same in
                          every call
    variables             today's date, the guest's name (a scrubbing placeholder, as curated calls
                          carry it), loyalty tier, and 0-3 of 40 policy excerpts, before the step's
                          instruction
    history               `history_share` of the calls carry 1-2 earlier turns of another call
"""

from __future__ import annotations

import json
import random

import pandas as pd

POLICY_WORDS = (
    "guests staff hotel booking request reply message policy privacy payment refund tone courteous brief accurate "
    "escalate supervisor record confirm verify identity loyalty member stay room service spa gym restaurant "
    "complaint safety accessibility language respond never always must should clearly concise data retention "
    "consent marketing regulation compliance audit log incident response time weekend holiday season rate"
).split()
TIERS = ("bronze", "silver", "gold", "platinum")
URGENCY_INSTRUCTION = ("You are the triage step of the Harbor Hotels concierge agent. Classify how urgent the guest's "
                       "message is, answering with exactly one of: urgent, routine, informational.")
TRUE_STEP = "true_step"
EXCERPTS = 40


def _sentences(rng: random.Random, count: int, words: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(POLICY_WORDS) for _ in range(rng.randint(*words))).capitalize() + "."
            for _ in range(count)]


def preamble(tokens: int, seed: int = 0) -> str:
    """Numbered policy sections of about `tokens` tokens, the same for a seed."""
    rng = random.Random(seed)
    sentences = _sentences(rng, max(1, int(tokens / 1.3 / 12)), (8, 16))
    sections = [sentences[i:i + 4] for i in range(0, len(sentences), 4)]
    return "\n".join(f"Section {n}. " + " ".join(section) for n, section in enumerate(sections, start=1))


def _system_prompt(rng: random.Random, shared: str, excerpts: list[str], instruction: str) -> str:
    variables = [f"Today is 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}.",
                 "You are speaking with <PERSON_1>.", f"Loyalty tier: {rng.choice(TIERS)}."]
    retrieved = rng.sample(excerpts, rng.randint(0, 3))
    context = ["Relevant policy excerpts:", *retrieved] if retrieved else []
    return "\n".join([shared, *variables, *context, instruction])


def production_calls(calls: pd.DataFrame, steps: dict[str, str], per_step: int = 150, preamble_tokens: int = 300,
                     history_share: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """Up to `per_step` calls of each step (`steps`: trace id -> true step) rewritten as above,
    with a `true_step` column; the intent calls' messages also make the triage step's calls."""
    rng = random.Random(seed)
    shared, excerpts = preamble(preamble_tokens, seed), _sentences(random.Random(seed + 1), EXCERPTS, (10, 18))
    calls = calls[calls["trace_id"].isin(steps)].assign(**{TRUE_STEP: lambda f: f["trace_id"].map(steps)})
    chosen = pd.concat([group.head(per_step) for _, group in calls.groupby(TRUE_STEP, sort=True)])
    triage = chosen[chosen[TRUE_STEP] == "classify_intent"].assign(**{TRUE_STEP: "triage_urgency"})
    triage = triage.assign(trace_id=triage["trace_id"] + "-triage")
    chosen = pd.concat([chosen, triage], ignore_index=True)
    turns = [m for messages in chosen["messages"] for m in json.loads(messages) if m.get("role") == "user"]
    rows = []
    for call in chosen.to_dict("records"):
        messages = json.loads(call["messages"])
        own = next((m["content"] for m in messages if m.get("role") == "system"), "")
        instruction = URGENCY_INSTRUCTION if call[TRUE_STEP] == "triage_urgency" else own
        rest = [m for m in messages if m.get("role") != "system"]
        if rng.random() < history_share:
            earlier = rng.sample(turns, rng.randint(1, 2))
            history = [turn for user in earlier for turn in (user, {"role": "assistant", "content": "Noted."})]
            rest = history + rest
        system = {"role": "system", "content": _system_prompt(rng, shared, excerpts, instruction)}
        rows.append({**call, "messages": json.dumps([system, *rest], ensure_ascii=False)})
    return pd.DataFrame(rows).reset_index(drop=True)
