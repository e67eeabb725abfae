"""The base SLM with retrieved examples: how many examples a prompt should show.

    python -m bench.incontext_bench --output output --cluster 0 [--shots 1,2,4] [--eval-calls 24]

Reads a finished run's output folder (`slm-convert run`): the cluster's example bank (its training
calls, `pipeline.incontext`) and the latest `--eval-calls` of its held-out calls, the ones shadow
evaluation answers by default. For each number of shots the bundled SmolLM2-135M-Instruct answers
them as shadow evaluation and the router do (retrieved solved calls as earlier turns, decoded in the
bank's answer format). Reported per number of shots: prompt tokens per call, mean score and exact
agreement against the logged answers, the share of answers in the format, and the seconds to
answer them in one batch. Appended to bench/results/incontext.jsonl with the machine, date and command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import results
from pipeline import evaluate, incontext, structured
from pipeline.calls import baseline_answer, render_prompt, renders_tools
from pipeline.cluster import cluster_key
from pipeline.scoring import score_answer
from pipeline.store import Store, read_json, read_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("output"))
    parser.add_argument("--cluster", type=int, default=0)
    parser.add_argument("--shots", default="1,2,4")
    parser.add_argument("--eval-calls", type=int, default=24)
    args = parser.parse_args()

    store = Store(args.output)
    folder = store.adapters / cluster_key(args.cluster) / "examples"
    record_path = store.adapters / cluster_key(args.cluster) / "in_context.json"
    if not record_path.is_file():
        raise SystemExit(f"no example bank for cluster {args.cluster} in {args.output}: run `slm-convert run` first")
    record = read_json(record_path)
    curated = read_table(store.table("curated_traces")).set_index("trace_id", drop=False)
    calls = curated.loc[record["holdout_ids"][-args.eval_calls:]].reset_index(drop=True)
    model, tokenizer = evaluate.load_adapter_model(Path(record["base_dir"]), None)
    found = structured.read_answer_format(folder)
    grammars = evaluate.call_grammars(model, tokenizer, found, calls)
    train_answers = [baseline_answer(r) for r in curated.loc[record["train_ids"]]["response_message"]]
    budget = evaluate.answer_token_budget(tokenizer, train_answers, 160)
    for shots in [int(s) for s in args.shots.split(",")]:
        bank = incontext.ExampleBank.load(folder)
        bank.shots = shots
        prompts = bank.prompts(list(calls["messages"]), list(calls["tools"]), renders_tools(tokenizer))
        tokens = [len(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts]
        started = time.perf_counter()
        answers = evaluate.generate_answers(model, tokenizer, prompts, budget, len(prompts), grammars=grammars)
        seconds = time.perf_counter() - started
        scores = [score_answer(baseline_answer(r), a, t)[1] for (a, _), r, t in zip(answers, calls["response_message"], calls["tools"])]
        row = {"cluster": args.cluster, "label": record["label"], "base_model": record["candidate"],
               "bank_calls": len(record["train_ids"]), "eval_calls": len(calls), "shots": shots,
               "prompt_tokens_per_call": round(float(np.mean(tokens)), 1),
               "mean_score": round(float(np.mean(scores)), 4), "exact": round(float(np.mean([s == 1 for s in scores])), 4),
               "in_format": round(float(np.mean([structured.answers_held_to(found, a) for a, _ in answers])), 4),
               "answer_seconds": round(seconds, 1)}
        results.record("incontext", {"benchmark": "in-context shots", **row})


if __name__ == "__main__":
    main()
