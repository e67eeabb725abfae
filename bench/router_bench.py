"""The router on loopback: routing overhead, SLM answer latency, throughput under bounded load.

    python -m bench.router_bench --sequential 40 --load 64 --concurrency 8

The router serves a registry with one promoted route, the sample's intent step (its match rule
computed as clustering computes it; the bundled base model with an untrained LoRA adapter, so it
answers as the base model: longer than a fine-tuned one would, a slow case; threshold 0, answer
budget `--max-new-tokens`), and forwards everything else to a fake OpenAI endpoint on loopback
that answers at once, so the fallback figures are the router's own overhead. Requests are the
sample's calls of every step in time order, sent through HTTP with a bearer token.

Measured, from the router's response headers:
- sequential (one request at a time): routing (embedding + match) p50/p95 in ms, the SLM path's
  latency p50/p95 (requests of the route), the fallback path's latency p50/p95;
- load (`--concurrency` clients, `--load` requests): requests/s, latency p50/p95, failed requests.
Appended to bench/results/router.jsonl with the machine, date and command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import results

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


def percentiles(values: list[float]) -> dict | None:
    return {"p50": round(float(np.percentile(values, 50)), 2), "p95": round(float(np.percentile(values, 95)), 2),
            "n": len(values)} if values else None


async def send_all(url: str, bodies: list[dict], concurrency: int) -> tuple[list, float]:
    """Every body sent with at most `concurrency` in flight; (responses or errors, seconds)."""
    import httpx

    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=600) as client:
        async def one(body):
            async with limit:
                try:
                    return await client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as err:
                    return err

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(b) for b in bodies))
        return answers, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=40, help="requests sent one at a time")
    parser.add_argument("--load", type=int, default=64, help="requests sent under concurrent load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the route's answer budget")
    parser.add_argument("--model-cache", type=Path, default=Path(os.environ.get("SLM_MODEL_CACHE", REPO / ".cache" / "models")))
    args = parser.parse_args()
    if min(args.sequential, args.load, args.concurrency, args.max_new_tokens) < 1:
        parser.error("--sequential, --load, --concurrency and --max-new-tokens must be at least 1")

    from pipeline import ingest, models
    from pipeline.router_service import Router, RouterSettings, serving
    from tests.fake_openai import FakeOpenAI
    from tests.router_setup import promoted_registry, step_route, untrained_adapter

    steps = {i: r["step"] for i, r in json.loads((REPO / "tests" / "fixtures" / "labels.json").read_text())["records"].items()}
    calls = ingest.read_calls(ingest.find_landing_files(REPO / "data" / "landing")).traces.sort_values("called_at")
    calls = calls.assign(step=calls["trace_id"].map(steps))
    candidate = next(c for c in models.load_candidates(REPO / "configs" / "candidates.yaml") if c.source == "bundled-gguf")
    base = models.resolve_model_dir(candidate, args.model_cache)

    def body(call) -> dict:
        request = {"model": "gpt-4.1", "messages": json.loads(call["messages"])}
        if isinstance(call["tools"], str):
            request["tools"] = json.loads(call["tools"])
        return request

    requests = [body(c) for _, c in calls.tail(args.sequential + args.load).iterrows()]
    fake = FakeOpenAI()
    with tempfile.TemporaryDirectory() as scratch, serving(fake.app()) as fallback_url:
        scratch = Path(scratch)
        adapter = untrained_adapter(base, scratch / "adapter")
        # the route's calls are the intent step's earlier calls; the requests are the latest ones
        route = step_route(calls[calls["step"] == "classify_intent"].head(400), "classify-intent", base, adapter, 0.0)
        registry = promoted_registry(scratch, [route], fallback_url + "/v1", args.max_new_tokens)
        router = Router(RouterSettings(registry=registry, landing_dir=scratch / "landing", tokens=(TOKEN,),
                                       slm_timeout=600))
        with serving(router.app(), limit_concurrency=args.concurrency * 2) as url:
            sequential, _ = asyncio.run(send_all(url, requests[: args.sequential], 1))
            loaded, load_seconds = asyncio.run(send_all(url, requests[args.sequential:], args.concurrency))

    def headers(responses, routed=None):
        return [r.headers for r in responses if not isinstance(r, Exception) and r.status_code == 200
                and (routed is None or (r.headers["x-slm-route"] != "none") == routed)]

    failed = [r for r in sequential + loaded if isinstance(r, Exception) or r.status_code != 200]
    routed = headers(sequential, routed=True)
    results.record("router", {
        "route": "classify-intent (untrained adapter: answers as the base model)",
        "max_new_tokens": args.max_new_tokens,
        "sequential": {
            "requests": len(sequential),
            "routing_ms": percentiles([float(h["x-slm-routing-ms"]) for h in headers(sequential)]),
            "slm_path_latency_ms": percentiles([float(h["x-slm-latency-ms"]) for h in routed]),
            "slm_served": sum(h["x-slm-served-by"] == "slm" for h in routed),
            "slm_escalated": {reason: sum(h.get("x-slm-reason", "").startswith(reason) for h in routed)
                              for reason in ("cut answer", "low confidence", "slm timeout", "slm error")},
            "fallback_path_latency_ms": percentiles([float(h["x-slm-latency-ms"]) for h in headers(sequential, routed=False)]),
        },
        "load": {
            "requests": len(loaded),
            "concurrency": args.concurrency,
            "requests_per_second": round(len(loaded) / load_seconds, 3),
            "latency_ms": percentiles([float(h["x-slm-latency-ms"]) for h in headers(loaded)]),
            "routed_share": round(len(headers(loaded, routed=True)) / max(1, len(headers(loaded))), 3),
        },
        "failed_requests": len(failed),
        "fallback_requests": len(fake.requests),
    })


if __name__ == "__main__":
    main()
