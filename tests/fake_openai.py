"""A stand-in for an OpenAI-compatible LLM endpoint on loopback (the router's fallback in tests
and benchmarks): answers every chat completion with one fixed text, streamed or not, and keeps
each request it got."""

from __future__ import annotations

import json
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

FALLBACK_ANSWER = "answer from the fallback LLM"


class FakeOpenAI:
    def __init__(self, answer: str = FALLBACK_ANSWER):
        self.answer = answer
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []

    async def chat_completions(self, request: Request):
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("authorization"))
        completion_id, created = f"chatcmpl-fake{len(self.requests):06d}", int(time.time())
        usage = {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
        if not body.get("stream"):
            completion = {"id": completion_id, "object": "chat.completion", "created": created, "model": body.get("model"),
                          "usage": usage, "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": self.answer}}]}
            # JSON escapes, as OpenAI's API writes them: an answer may then hold any code point, a lone surrogate too
            return Response(json.dumps(completion), media_type="application/json")
        words = self.answer.split(" ")
        pieces = [{"role": "assistant", "content": words[0]}] + [{"content": " " + w} for w in words[1:]]
        chunks = [{"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.get("model"),
                   "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in pieces]
        chunks.append({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": body.get("model"), "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat_completions, methods=["POST"])])
