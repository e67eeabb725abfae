"""LLM-as-judge (optional, off by default): a model behind any OpenAI-compatible chat endpoint
grades an SLM's free-text answer against the logged LLM answer to the same request.

Structured answers (labels, JSON objects, tool calls, final numbers) keep their exact scorers;
only free text, where word-level comparison says little, is worth a judge's call.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

INSTRUCTIONS = (
    "You grade answers. Given a request, a reference answer that is known to be acceptable, and a "
    "candidate answer, reply with one number between 0 and 1: how fully the candidate does what the "
    "reference does for this request (1: equally good, 0: wrong or unhelpful). Reply with the number only."
)
_NUMBER = re.compile(r"\d*\.?\d+")


class JudgeError(RuntimeError):
    pass


@dataclass(frozen=True)
class Judge:
    base_url: str  # e.g. https://api.openai.com/v1 or http://localhost:8000/v1
    model: str
    api_key: str = ""
    timeout_s: float = 60.0

    def score(self, request: str, reference: str, candidate: str) -> float:
        """The judge's grade in [0, 1]."""
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": INSTRUCTIONS},
                {"role": "user", "content": f"Request:\n{request}\n\nReference answer:\n{reference}\n\n"
                                            f"Candidate answer:\n{candidate}"},
            ],
        }
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        http_request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as err:
            raise JudgeError(f"the LLM judge at {url} did not answer ({err}); check judge_base_url and its key, "
                             "or turn the judge off") from err
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"the LLM judge at {url} answered without a message: {str(reply)[:200]}") from err
        match = _NUMBER.search(text or "")
        if not match:
            raise JudgeError(f"the LLM judge at {url} answered {text[:100]!r}, not a number between 0 and 1")
        return min(max(float(match.group(0)), 0.0), 1.0)
