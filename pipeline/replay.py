"""Replay held-out calls through `slm-router`: what the promoted routes do with traffic they
never saw, end to end over HTTP.

The router is started on loopback over the run's registry, with its fallback pointed at a
stand-in for the frontier model that answers each call with the answer the LLM logged for it
(so no call leaves the machine, and an escalated call gets exactly the LLM's answer). Each call
is sent as the agent sent it; the router's response headers say who answered, why a call was
escalated and how long it took, and the specialists' answers are scored against the logged ones.
No trace log is written: replayed calls are not new traffic.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.calls import baseline_answer
from pipeline.scoring import score_answer


def held_out_calls(curated: pd.DataFrame, assignments: pd.DataFrame, predictions: pd.DataFrame,
                   per_unevaluated_cluster: int = 24, limit: int = 300) -> pd.DataFrame:
    """Calls to replay, in time order: each evaluated cluster's test calls (never trained on, never
    used to choose a threshold), and the latest calls of every cluster that was not evaluated
    (kept on the LLM, or unclustered), as traffic that the router must leave to the LLM."""
    test_ids = set(predictions.loc[predictions["split"] == "test", "trace_id"]) if len(predictions) else set()
    evaluated = set(predictions["cluster_id"]) if len(predictions) else set()
    others = assignments[~assignments["cluster_id"].isin(evaluated)]
    calls = curated.merge(assignments[["trace_id", "cluster_id"]], on="trace_id")
    latest = (calls[calls["trace_id"].isin(others["trace_id"])].sort_values("called_at")
              .groupby("cluster_id").tail(per_unevaluated_cluster))
    chosen = pd.concat([calls[calls["trace_id"].isin(test_ids)], latest]).sort_values(["called_at", "trace_id"])
    return chosen.tail(limit).reset_index(drop=True)


def logged_llm_app(calls: pd.DataFrame):
    """An OpenAI-compatible endpoint that answers each known call with its logged answer (by its
    messages), and 404 for a call it does not know."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    answers = {_call_key(json.loads(m)): json.loads(r) for m, r in zip(calls["messages"], calls["response_message"])}

    async def completions(request: Request) -> JSONResponse:
        payload = await request.json()
        message = answers.get(_call_key(payload.get("messages")))
        if message is None:
            return JSONResponse({"error": {"message": "call not in the log", "type": "not_found"}}, status_code=404)
        return JSONResponse({"id": f"replay-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                             "model": payload.get("model"), "created": int(time.time()),
                             "choices": [{"index": 0, "message": message,
                                          "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}]})

    return Starlette(routes=[Route("/chat/completions", completions, methods=["POST"])])


def _call_key(messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


@dataclass
class ReplayResult:
    calls: int = 0
    served: Counter = field(default_factory=Counter)  # route -> calls its specialist answered
    offered: Counter = field(default_factory=Counter)  # route -> calls matched to it
    reasons: Counter = field(default_factory=Counter)  # why calls were escalated
    scores: list[float] = field(default_factory=list)  # specialist answers against the logged ones
    slm_ms: list[float] = field(default_factory=list)
    routing_ms: list[float] = field(default_factory=list)
    failed: int = 0  # requests that got no answer at all (must stay 0)

    def summary(self) -> dict:
        served = sum(self.served.values())
        p50 = lambda values: round(float(np.percentile(values, 50)), 1) if values else None  # noqa: E731
        return {"calls": self.calls, "answered_by_specialists": served,
                "share_answered": round(served / self.calls, 4) if self.calls else 0.0,
                "per_route": {route: {"answered": self.served[route], "matched": self.offered[route]}
                              for route in sorted(self.offered)},
                "agreement_with_logged": round(float(np.mean(self.scores)), 4) if self.scores else None,
                "escalated": dict(self.reasons.most_common()), "failed": self.failed,
                "specialist_latency_ms_p50": p50(self.slm_ms), "routing_ms_p50": p50(self.routing_ms)}


def replay(registry: Path, calls: pd.DataFrame, timeout: float = 120.0) -> dict:
    """Send `calls` (canonical traces) one by one through slm-router over `registry`; the summary."""
    import httpx

    from pipeline.router_service import Router, RouterSettings, serving

    result = ReplayResult()
    with serving(logged_llm_app(calls)) as upstream:
        router = Router(RouterSettings(registry=registry, landing_dir=None, tokens=(), fallback_base_url=upstream))
        with serving(router.app()) as url, httpx.Client(base_url=url, timeout=timeout) as client:
            for messages, tools, response in zip(calls["messages"], calls["tools"], calls["response_message"]):
                tools = tools if isinstance(tools, str) and tools else None  # missing: None or NaN
                body = {"model": "gpt-4.1", "messages": json.loads(messages)}
                if tools:
                    body["tools"] = json.loads(tools)
                result.calls += 1
                try:
                    answer = client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError:
                    result.failed += 1
                    continue
                headers = answer.headers
                route = headers.get("x-slm-route", "none").split("@")[0]
                if route != "none":
                    result.offered[route] += 1
                if headers.get("x-slm-routing-ms"):
                    result.routing_ms.append(float(headers["x-slm-routing-ms"]))
                if answer.status_code >= 400:
                    result.failed += 1
                elif headers.get("x-slm-served-by") == "slm":
                    result.served[route] += 1
                    result.slm_ms.append(float(headers.get("x-slm-latency-ms", "nan")))
                    text = answer.json()["choices"][0]["message"].get("content") or ""
                    result.scores.append(score_answer(baseline_answer(response), text, tools)[1])
                else:
                    result.reasons[headers.get("x-slm-reason", "unknown").split(":")[0]] += 1
    return result.summary()


def format_replay(summary: dict) -> str:
    """The replay's outcome for a person, a few lines."""
    lines = [f"Router replay: {summary['calls']} held-out calls no specialist was trained on, sent through slm-router "
             "on loopback (fallback: the LLM's logged answers)"]
    per_route = ", ".join(f"{name} {r['answered']} of {r['matched']}" for name, r in summary["per_route"].items())
    agreement = summary["agreement_with_logged"]
    lines.append(f"  answered by specialists: {summary['answered_by_specialists']} ({summary['share_answered']:.0%})"
                 + (f": {per_route}" if per_route else "")
                 + (f"; agreement with the logged answers {agreement:.3f}" if agreement is not None else ""))
    escalated = ", ".join(f"{reason} {count}" for reason, count in summary["escalated"].items())
    lines.append(f"  escalated to the LLM: {sum(summary['escalated'].values())}" + (f" ({escalated})" if escalated else "")
                 + (f"; {summary['failed']} requests failed" if summary["failed"] else ""))
    if summary["specialist_latency_ms_p50"] is not None:
        lines.append(f"  latency p50: {summary['specialist_latency_ms_p50']:.0f} ms a request a specialist answered "
                     f"(routing included); routing {summary['routing_ms_p50']:.{1 if summary['routing_ms_p50'] < 10 else 0}f} ms "
                     "over all requests")
    return "\n".join(lines)
