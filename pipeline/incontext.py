"""The base SLM with retrieved examples: a specialist that is built, not trained.

For a step whose answers a generator must write (tool calls, free text), the cheapest candidate
to build is the base SLM itself, shown a few of the cluster's solved training calls most like the
one it answers (in-context learning). Nothing is trained: the candidate is its example bank, the
cluster's training calls with the answers the LLM gave, written once into a folder:

    examples.jsonl        one solved call a line: its messages, tools and the logged answer
    answer_format.json    the shape its answers are decoded in (`pipeline.structured`)
    bank.json             how many examples a prompt shows
    README.md             a model card: what it answers, from how many examples

It is measured under the same gate as a fine-tuned adapter (shadow evaluation answers the same
held-out calls; `pipeline.evaluate.evaluate_cluster` with `examples=`), and promotion keeps the
cheapest candidate that passes. The router serves it in-process: the base model, no adapter,
prompts with the examples retrieved for each call. Retrieval is TF-IDF cosine over the calls'
last requests, fitted on the bank when it is loaded (milliseconds for a cluster's calls).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.calls import Chat, chat_of_call, few_shot_prompt, signature_parts, solved_call
from pipeline.structured import ANSWER_FORMAT_FILE, write_answer_format

EXAMPLES_FILE = "examples.jsonl"
BANK_FILE = "bank.json"  # how many examples a prompt shows, and what the bank holds
CARD_FILE = "README.md"
DEFAULT_SHOTS = 1  # bench/results/incontext.jsonl: as good as 2 or 4 on the tool step, fastest


def _request(messages_json: str, tools_json: str | None) -> str:
    """What retrieval compares: the call's last request (its instructions are the cluster's own)."""
    return signature_parts(messages_json, tools_json)[2]


@dataclass
class ExampleBank:
    """Solved calls of a cluster, and the ones most like a new call."""

    messages: list[str]  # each example's messages (JSON)
    tools: list[str | None]
    responses: list[str]  # each example's logged response message (JSON)
    shots: int = DEFAULT_SHOTS

    def __post_init__(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not self.messages:
            raise ValueError("an example bank needs at least one solved call")
        requests = [_request(m, t) for m, t in zip(self.messages, self.tools)]
        self._vectorizer = TfidfVectorizer(sublinear_tf=True).fit(requests)
        self._vectors = self._vectorizer.transform(requests)

    @classmethod
    def of_calls(cls, calls: pd.DataFrame, shots: int = DEFAULT_SHOTS) -> ExampleBank:
        tools = [t if isinstance(t, str) else None for t in calls["tools"]]
        return cls(list(calls["messages"]), tools, list(calls["response_message"]), shots)

    @classmethod
    def load(cls, folder: Path) -> ExampleBank:
        lines = _examples(folder)
        spec = json.loads((Path(folder) / BANK_FILE).read_text()) if (Path(folder) / BANK_FILE).is_file() else {}
        return cls([e["messages"] for e in lines], [e.get("tools") for e in lines],
                   [e["response_message"] for e in lines], int(spec.get("shots", DEFAULT_SHOTS)))

    def __len__(self) -> int:
        return len(self.messages)

    def nearest(self, messages_json: list[str], tools_json: list[str | None]) -> list[list[int]]:
        """For each call, the positions of the `shots` examples whose request is most like its
        own, most similar first (ties: the earlier example)."""
        requests = [_request(m, t) for m, t in zip(messages_json, tools_json)]
        similarity = (self._vectorizer.transform(requests) @ self._vectors.T).toarray()
        return [list(np.argsort(-row, kind="stable")[: self.shots]) for row in similarity]

    def prompts(self, messages_json: list[str], tools_json: list, native_tools: bool) -> list[Chat]:
        """Each call's prompt with its retrieved examples as earlier solved turns (a call's tools:
        JSON, or anything else for none, as in a calls table)."""
        prompts = []
        for messages, tools, picks in zip(messages_json, tools_json, self.nearest(messages_json, tools_json)):
            examples = [solved_call(self.messages[i], self.tools[i], self.responses[i], native_tools) for i in picks]
            prompts.append(few_shot_prompt(chat_of_call(messages, tools, native_tools), examples))
        return prompts


def _examples(folder: Path) -> list[dict]:
    """The solved calls of a bank folder, as written (`write_bank`)."""
    return [json.loads(line) for line in (Path(folder) / EXAMPLES_FILE).read_text().splitlines() if line.strip()]


def scrubbed_texts(folder: Path) -> list[str]:
    """The texts of a bank that curation scrubbed of personal data (each example's messages, tool
    definitions and answer), for the same leak check as the curated calls."""
    return [text for example in _examples(folder) for text in (example["messages"], example["tools"], example["response_message"])
            if isinstance(text, str)]


def bank_fingerprint(base_model: str, train_ids: list[str], shots: int) -> str:
    """Changes whenever the bank's calls or settings change (the bank is written again then)."""
    payload = json.dumps(["in_context", base_model, sorted(train_ids), shots])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_bank(folder: Path, calls: pd.DataFrame, answers: list[str], native_tools: bool, shots: int,
               base_model: str, task: str) -> dict:
    """Write a cluster's example bank (its solved training calls `calls`, whose answer texts are
    `answers`) into `folder`; the answer format written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / EXAMPLES_FILE, "w") as out:
        for messages, tools, response in zip(calls["messages"], calls["tools"], calls["response_message"]):
            out.write(json.dumps({"messages": messages, "tools": tools if isinstance(tools, str) else None,
                                  "response_message": response}, ensure_ascii=False) + "\n")
    (folder / BANK_FILE).write_text(json.dumps({"shots": shots, "examples": len(calls), "base_model": base_model}) + "\n")
    found = write_answer_format(folder, answers, native_tools)
    (folder / CARD_FILE).write_text(
        f"# {task}: {base_model} with retrieved examples\n\n"
        f"No weights are trained. For each call, the {shots} of these {len(calls)} solved calls of the step "
        f"(earlier calls, with the answers the logged LLM gave, personal data already replaced) whose request "
        f"is most like its own are shown to {base_model} as earlier turns; its answer is decoded as "
        f"{found['shape'].replace('_', ' ')} (answer_format.json).\n"
    )
    return found


NEEDED_FILES = (EXAMPLES_FILE, ANSWER_FORMAT_FILE)


def servability_problems(folder: Path, base_model_path: str) -> list[str]:
    """Why this example bank cannot be served, if it cannot: files missing, no example, or no base model."""
    folder = Path(folder)
    problems = [f"{name} missing" for name in NEEDED_FILES if not (folder / name).is_file()]
    if not problems and not (folder / EXAMPLES_FILE).read_text().strip():
        problems.append("the example bank is empty")
    if not (Path(base_model_path) / "config.json").is_file():
        problems.append(f"base model {base_model_path} not found")
    return problems
