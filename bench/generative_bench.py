"""Generative specialists: what structured decoding and training without the shared instructions buy.

    python -m bench.generative_bench --output output --clusters 0,2,3 [--steps 6] [--eval-calls 24]

Reads a finished run's output folder (`slm-convert run`) for its curated calls and clusters. For
each cluster named, the calls are split by time as the run splits them; a LoRA adapter of the
bundled SmolLM2-135M-Instruct is trained at the demo's settings (`--steps` steps of 2 packed rows
of 768 tokens) twice: on the whole prompts, and without the instructions all the cluster's calls
share (`calls.SharedInstructions`). The latest `--eval-calls` held-out calls (what shadow
evaluation answers by default) are answered by each: the first adapter free and with structured
decoding (`pipeline.structured`), the second with structured decoding. Reported per arm: prompt
tokens per call trained on, calls trained on, training seconds, mean score and exact agreement
against the logged answers, and the share of answers in the cluster's format. Appended to
bench/results/generative.jsonl with the machine, date and command.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import results
from pipeline import evaluate, finetune, models, structured
from pipeline.calls import baseline_answer, factor_out, read_instructions, renders_tools
from pipeline.scoring import score_answer
from pipeline.store import Store, read_table

REPO = Path(__file__).resolve().parents[1]


def answer(model, tokenizer, calls, adapter_dir: Path, structured_decoding: bool, factored: bool, budget: int) -> dict:
    """The adapter's answers to `calls`, scored against the logged ones."""
    found = structured.read_answer_format(adapter_dir)
    asked = factor_out(calls, read_instructions(adapter_dir))[0] if factored else calls
    prompts = evaluate.prompts_of(asked, renders_tools(tokenizer))
    grammars = evaluate.call_grammars(model, tokenizer, found, calls) if structured_decoding else None
    started = time.perf_counter()
    with evaluate.lora_merged(model):
        answers = evaluate.generate_answers(model, tokenizer, prompts, budget, 8, grammars=grammars)
    scores = [score_answer(baseline_answer(r), a, t)[1] for (a, _), r, t in zip(answers, calls["response_message"], calls["tools"])]
    return {"mean_score": round(float(np.mean(scores)), 4), "exact": round(float(np.mean([s == 1 for s in scores])), 4),
            "in_format": round(float(np.mean([structured.answers_held_to(found, a) for a, _ in answers])), 4),
            "mean_confidence": round(float(np.mean([c for _, c in answers])), 4),
            "answer_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("output"))
    parser.add_argument("--clusters", default="0")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-calls", type=int, default=24)
    args = parser.parse_args()

    store = Store(Path(args.output))
    calls = read_table(store.table("curated_traces")).merge(
        read_table(store.table("task_clusters"))[["trace_id", "cluster_id"]], on="trace_id")
    bundled = next(c for c in models.load_candidates(REPO / "configs" / "candidates.yaml") if c.source == "bundled-gguf")
    base_dir = models.resolve_model_dir(bundled, REPO / ".cache" / "models")
    measured = {}
    for cluster_id in [int(c) for c in args.clusters.split(",")]:
        train, holdout = finetune.split_by_time(calls[calls["cluster_id"] == cluster_id], finetune.SplitSettings())
        held = holdout.iloc[-args.eval_calls:]
        arms = {}
        with tempfile.TemporaryDirectory() as folder:
            for factored in (False, True):
                settings = finetune.TrainSettings(max_steps=args.steps, batch_size=2, max_length=768,
                                                  factor_instructions=factored)
                adapter_dir = Path(folder) / f"factored-{factored}"
                started = time.perf_counter()
                metrics = finetune.train_adapter(base_dir, train, adapter_dir, settings, progress=lambda m: None)
                trained = {"prompt_tokens_per_call": metrics["prompt_tokens_per_call"]["trained_on"],
                           "train_seconds": round(time.perf_counter() - started, 1), "tokens": metrics["tokens"]}
                model, tokenizer = evaluate.load_adapter_model(base_dir, adapter_dir)
                budget = evaluate.answer_token_budget(tokenizer, [baseline_answer(r) for r in train["response_message"]],
                                                      evaluate.GenerationSettings.max_new_tokens_cap)
                for structured_decoding in ((False, True) if not factored else (True,)):
                    name = f"{'without' if factored else 'with'}_instructions_{'structured' if structured_decoding else 'free'}"
                    arms[name] = {**trained, **answer(model, tokenizer, held, adapter_dir, structured_decoding, factored, budget)}
                    print(cluster_id, name, arms[name], flush=True)
                del model
        measured[str(cluster_id)] = {"train_calls": len(train), "eval_calls": len(held),
                                     "answer_format": structured.answer_format(
                                         [baseline_answer(r) for r in train["response_message"]])["shape"], "arms": arms}
    results.record("generative", {"base_model": bundled.name, "steps": args.steps, "clusters": measured})


if __name__ == "__main__":
    main()
