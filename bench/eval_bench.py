"""Shadow evaluation's generation: batched (by length, shared prefix, KV cache, greedy) against one call at a time.

    python -m bench.eval_bench --calls-per-step 32 --batch-size 32 --single-calls 8
    python -m bench.eval_bench --latest-calls 1000 --single-calls 8   # the sample's latest 1,000 calls, every step
    python -m bench.eval_bench --compare-padded-prefill --steps call_tool   # prefill with and without padding
    python -m bench.eval_bench --compare-growing-cache --steps call_tool    # a cache that grows per token

Shadow evaluation answers one cluster's calls at a time, so this bench does too: for each step
of the bundled sample (its true step from tests/fixtures/labels.json, read by the bench only),
its latest `--calls-per-step` calls are answered by `evaluate.generate_answers` in batches of
`--batch-size`, and the first `--single-calls` of them once more one call per `generate`
(no batching, no shared prefix), with the step's answer-token budget (longest logged answer,
capped); or, with `--latest-calls N`, the sample's latest N calls in all, each step answering
its own share of them, as shadow evaluation answers each cluster's held-out calls. Reported per
step and in all: calls/s of each, the speedup, and the share of calls
whose answer is the same both ways. The bundled base model has no adapter, so on steps with
long answers it writes up to its budget where a fine-tuned one would stop: a slow case.
Appended to bench/results/evaluation.jsonl with the device, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from unittest.mock import patch

from bench import results

REPO = Path(__file__).resolve().parents[1]


def padded_prefill():
    """Shadow evaluation's generation as it was before its padding-free prefill: the shared
    prefix alone is run before `generate`, which then runs every row's own part padded to the
    batch's longest."""
    import torch
    from transformers import DynamicCache

    from pipeline import evaluate

    def prefix_only(model, sequences, shared, width, pad_token_id):
        if not shared:
            return None
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([sequences[0][:shared]], device=model.device), **{evaluate.cache_keyword(model): cache},
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(sequences))
        return cache

    return patch.object(evaluate, "_prefilled_cache", prefix_only)


def growing_cache():
    """Shadow evaluation's generation as it was before its cache had room for the answers:
    `generate` appends each new token's keys and values to a cache that grows."""
    from pipeline import evaluate

    return patch.object(evaluate, "_room_for_answers", lambda model, cache, length: cache)


# The earlier ways of generating that `--compare-<name>` also times, each as a context manager;
# the figures are named after them.
EARLIER_WAYS = {"padded_prefill": padded_prefill, "growing_cache": growing_cache}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls-per-step", type=int, default=32)
    parser.add_argument("--latest-calls", type=int, default=0,
                        help="answer the sample's latest N calls in all, each step its share (instead of --calls-per-step)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--single-calls", type=int, default=8, help="calls per step also answered one at a time")
    parser.add_argument("--max-new-tokens-cap", type=int, default=160)
    parser.add_argument("--steps", default="", help="comma-separated true steps to run (default: all)")
    parser.add_argument("--compare-padded-prefill", action="store_true",
                        help="also answer the batches the earlier way (the padding run through the model), same process")
    parser.add_argument("--compare-growing-cache", action="store_true",
                        help="also answer the batches the earlier way (a cache that grows per token), same process")
    parser.add_argument("--model-cache", type=Path, default=Path(os.environ.get("SLM_MODEL_CACHE", REPO / ".cache" / "models")))
    args = parser.parse_args()
    if min(args.calls_per_step, args.batch_size, args.single_calls) < 1 or args.latest_calls < 0:
        parser.error("--calls-per-step, --batch-size and --single-calls must be at least 1, --latest-calls not negative")

    import torch

    from pipeline import evaluate, ingest, models
    from pipeline.calls import baseline_answer, renders_tools

    steps = {i: r["step"] for i, r in json.loads((REPO / "tests" / "fixtures" / "labels.json").read_text())["records"].items()}
    traces = ingest.read_calls(ingest.find_landing_files(REPO / "data" / "landing")).traces.sort_values("called_at")
    candidate = next(c for c in models.load_candidates(REPO / "configs" / "candidates.yaml") if c.source == "bundled-gguf")
    model, tokenizer = evaluate.load_adapter_model(models.resolve_model_dir(candidate, args.model_cache), None)
    native_tools = renders_tools(tokenizer)
    if args.latest_calls:
        traces = traces.tail(args.latest_calls)
    per_step = {}
    for step, calls in traces.groupby(traces["trace_id"].map(steps)):
        if args.steps and step not in args.steps.split(","):
            continue
        if not args.latest_calls:
            calls = calls.tail(args.calls_per_step)
        prompts = evaluate.prompts_of(calls, native_tools)
        budget = evaluate.answer_token_budget(tokenizer, [baseline_answer(r) for r in calls["response_message"]],
                                              args.max_new_tokens_cap)
        started = time.perf_counter()
        batched = evaluate.generate_answers(model, tokenizer, prompts, budget, args.batch_size)
        batched_seconds = time.perf_counter() - started
        single_seconds: list[float] = []
        single = [evaluate.generate_answers(model, tokenizer, [p], budget, 1, batch_seconds=single_seconds)[0]
                  for p in prompts[: args.single_calls]]
        batched_rate, single_rate = len(prompts) / batched_seconds, len(single) / sum(single_seconds)
        per_step[step] = {
            "calls": len(prompts), "max_new_tokens": budget,
            "batched_seconds": round(batched_seconds, 1),
            "batched_calls_per_second": round(batched_rate, 3),
            "one_at_a_time_calls_per_second": round(single_rate, 3),
            "speedup": round(batched_rate / single_rate, 2),
            "same_answer_share": round(sum(a == b for (a, _), (b, _) in zip(batched, single)) / len(single), 3),
        }
        for name, earlier_way in EARLIER_WAYS.items():
            if not getattr(args, f"compare_{name}"):
                continue
            started = time.perf_counter()
            with earlier_way():
                earlier = evaluate.generate_answers(model, tokenizer, prompts, budget, args.batch_size)
            per_step[step][f"{name}_seconds"] = round(time.perf_counter() - started, 1)
            per_step[step][f"{name}_same_answers"] = [a for a, _ in earlier] == [a for a, _ in batched]
        print(step, per_step[step], flush=True)
    calls = sum(s["calls"] for s in per_step.values())
    seconds = sum(s["batched_seconds"] for s in per_step.values())
    results.record("evaluation", {
        "benchmark": "batched_generation_per_step",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "model": candidate.name,
        "batch_size": args.batch_size,
        "calls": calls,
        "batched_seconds": round(seconds, 1),
        "batched_calls_per_second": round(calls / seconds, 3),
        # every call one per `generate`, at the rate measured on each step's first --single-calls
        "one_at_a_time_seconds_at_measured_rates": round(
            sum(s["calls"] / s["one_at_a_time_calls_per_second"] for s in per_step.values()), 1),
        "by_step": per_step,
    })


if __name__ == "__main__":
    main()
