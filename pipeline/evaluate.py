"""Step 6, shadow evaluation: the fine-tuned SLM answers each cluster's held-out calls.

Generation is batched (left padding, KV cache, greedy). Each answer is scored against the logged
baseline answer with the scorer its shape calls for (`pipeline.scoring`), and gets a confidence:
the geometric mean of the probabilities of the tokens it generated. A confidence threshold is
calibrated on the held-out answers: the lowest one at which the answers kept still meet the
quality floor. Below it the router escalates to the LLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.calls import Chat, baseline_answer, chat_of_call, render_prompt, renders_tools
from pipeline.scoring import score_answer


@dataclass
class GenerationSettings:
    batch_size: int = 8
    max_new_tokens_cap: int = 384


def load_adapter_model(base_dir: Path, adapter_dir: Path | None):
    """The base model with a LoRA adapter on top (or the bare base model), ready to generate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or base_dir)
    tokenizer.padding_side = "left"  # generation continues each row from its last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def generate_answers(
    model, tokenizer, prompts: list[Chat], max_new_tokens: int, batch_size: int,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[str, float]]:
    """(answer, confidence) per prompt, generated greedily in batches."""
    import torch

    results: list[tuple[str, float]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        texts = [render_prompt(tokenizer, chat) for chat in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        log_probs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        for row in range(len(batch)):
            tokens = new_tokens[row].tolist()
            length = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else len(tokens)
            mean_log_prob = float(log_probs[row, :length].float().mean()) if length else -math.inf
            answer = tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
            results.append((answer, math.exp(mean_log_prob)))
        if progress:
            progress(f"generated {len(results)}/{len(prompts)} answers")
    return results


def answer_token_budget(tokenizer, answers: list[str], cap: int) -> int:
    """Room for the longest answer the baseline gave, plus a margin, within a cap."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=16)
    return int(min(cap, longest * 1.25 + 8))


def score_holdout(holdout: pd.DataFrame, generated: list[tuple[str, float]]) -> pd.DataFrame:
    rows = []
    for (_, call), (answer, confidence) in zip(holdout.iterrows(), generated):
        baseline = baseline_answer(call["response_message"])
        scorer, score = score_answer(baseline, answer)
        rows.append(
            {
                "trace_id": call["trace_id"],
                "scorer": scorer,
                "score": score,
                "confidence": confidence,
                "baseline_answer": baseline,
                "slm_answer": answer,
                "feedback": call["feedback"],
            }
        )
    return pd.DataFrame(rows)


def calibrate_threshold(scored: pd.DataFrame, quality_floor: float) -> tuple[float | None, float]:
    """(threshold, coverage): the lowest confidence at which the answers at or above it
    average at least the quality floor, and the share of calls the SLM then answers.

    None means no threshold reaches the floor: every call would be escalated.
    """
    if scored.empty:
        return None, 0.0
    ordered = scored.sort_values("confidence", ascending=False)
    running_mean = ordered["score"].expanding().mean().to_numpy()
    meets = np.flatnonzero(running_mean >= quality_floor)
    if len(meets) == 0:
        return None, 0.0
    last = meets[-1]
    return float(ordered["confidence"].iloc[last]), float((last + 1) / len(ordered))


def evaluate_cluster(
    model, tokenizer, holdout: pd.DataFrame, train_answers: list[str], quality_floor: float,
    settings: GenerationSettings, progress: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Scored held-out answers and the cluster's summary figures."""
    native_tools = renders_tools(tokenizer)
    prompts = [chat_of_call(m, t, native_tools) for m, t in zip(holdout["messages"], holdout["tools"])]
    budget = answer_token_budget(tokenizer, train_answers, settings.max_new_tokens_cap)
    generated = generate_answers(model, tokenizer, prompts, budget, settings.batch_size, progress)
    scored = score_holdout(holdout, generated)
    threshold, coverage = calibrate_threshold(scored, quality_floor)
    answered = scored[scored["confidence"] >= threshold] if threshold is not None else scored.iloc[0:0]
    summary = {
        "holdout_calls": int(len(scored)),
        "score_vs_baseline": round(float(scored["score"].mean()), 4) if len(scored) else 0.0,
        "exact_agreement": round(float((scored["score"] == 1.0).mean()), 4) if len(scored) else 0.0,
        "scorers": scored["scorer"].value_counts().to_dict(),
        "confidence_threshold": threshold,
        "coverage_at_threshold": round(coverage, 4),
        "score_at_threshold": round(float(answered["score"].mean()), 4) if len(answered) else None,
        "answered_at_threshold": int(len(answered)),
        "max_new_tokens": budget,
    }
    return scored, summary
