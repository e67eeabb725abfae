"""Shadow evaluation's generation: batched (left padding, KV cache, greedy) against one call at a time.

    python -m bench.eval_bench --calls 64 --batch-size 8        # the bundled base model, CPU or GPU

The same calls of the bundled sample (drawn at random, every step type in its share of the
traffic) are answered twice by `evaluate.generate_answers` with the same answer-token budget:
once in batches of `--batch-size`, once one call per `generate`. Reported: calls/s and seconds
per call of each, the speedup, and the share of calls whose answer is the same both ways
(greedy decoding; left padding may flip a near-tie). Appended to bench/results/evaluation.jsonl
with the device, date and command.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench import results

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens-cap", type=int, default=160)
    parser.add_argument("--model-cache", type=Path, default=Path(os.environ.get("SLM_MODEL_CACHE", REPO / ".cache" / "models")))
    args = parser.parse_args()

    import torch

    from pipeline import evaluate, ingest, models
    from pipeline.calls import baseline_answer, chat_of_call, renders_tools

    traces = ingest.read_calls(ingest.find_landing_files(REPO / "data" / "landing")).traces
    calls = traces.sample(n=min(args.calls, len(traces)), random_state=0)
    candidate = next(c for c in models.load_candidates(REPO / "configs" / "candidates.yaml") if c.source == "bundled-gguf")
    model, tokenizer = evaluate.load_adapter_model(models.resolve_model_dir(candidate, args.model_cache), None)
    native_tools = renders_tools(tokenizer)
    prompts = [chat_of_call(m, t, native_tools) for m, t in zip(calls["messages"], calls["tools"])]
    budget = evaluate.answer_token_budget(tokenizer, [baseline_answer(r) for r in calls["response_message"]],
                                          args.max_new_tokens_cap)

    def timed(batch_size: int):
        started = time.perf_counter()
        answers = evaluate.generate_answers(model, tokenizer, prompts, budget, batch_size)
        return answers, time.perf_counter() - started

    batched, batched_seconds = timed(args.batch_size)
    single, single_seconds = timed(1)
    same = sum(a == b for (a, _), (b, _) in zip(batched, single)) / len(prompts)
    results.record("evaluation", {
        "benchmark": "batched_generation",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "model": candidate.name,
        "calls": len(prompts),
        "max_new_tokens": budget,
        "batch_size": args.batch_size,
        "batched_seconds": round(batched_seconds, 1),
        "one_at_a_time_seconds": round(single_seconds, 1),
        "batched_calls_per_second": round(len(prompts) / batched_seconds, 3),
        "one_at_a_time_calls_per_second": round(len(prompts) / single_seconds, 3),
        "speedup": round(single_seconds / batched_seconds, 2),
        "same_answer_share": round(same, 3),
    })


if __name__ == "__main__":
    main()
