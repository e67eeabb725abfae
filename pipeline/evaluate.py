"""Step 6, shadow evaluation: the fine-tuned SLM answers each cluster's held-out calls.

Generation is batched (by prompt length, the shared system prompt encoded once, KV cache,
greedy). Each answer is scored against the logged baseline answer with the scorer its shape
calls for (`pipeline.scoring`), and gets a confidence: the geometric mean of the probabilities
of the tokens it generated.

The held-out calls are split by time once more. On the earlier part (calibration) the confidence
threshold is chosen: the lowest one at which the answers kept still meet the quality floor; below
it the router escalates to the LLM. The later part (test) is never looked at while choosing, so
the coverage and score reported at that threshold, and the promotion bound computed from them,
are not flattered by the choice.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.calls import (
    Chat, SharedInstructions, baseline_answer, chat_of_call, factor_out, render_prompt,
    renders_tools, signature_parts, solved_call,
)
from pipeline.incontext import ExampleBank
from pipeline.judge import Judge
from pipeline.models import require_checkpoint
from pipeline.scoring import FREE_TEXT, score_answer

LLM_JUDGE = "llm_judge"


@dataclass
class GenerationSettings:
    batch_size: int = 32
    max_new_tokens_cap: int = 384
    latency_calls: int = 2  # test calls answered one at a time too, for the batch-1 latency
    arm_calls: int = 4  # latest test calls the base model answers too, zero-shot and with examples
    shots: int = 2  # retrieved training calls shown in the in-context arm; 0: no such arm


@dataclass
class Prices:
    """What a call costs: the LLM by its token prices, the SLM by the hour of its hardware."""

    llm_input_per_million_tokens: float = 2.0  # gpt-4.1 list price, USD
    llm_output_per_million_tokens: float = 8.0
    slm_hardware_per_hour: float = 0.10  # USD per hour of the machine the SLM runs on


CALIBRATION, TEST = "calibration", "test"


def hardware() -> str:
    """The machine the answers are generated on, as far as latency depends on it."""
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


def load_adapter_model(base_dir: Path, adapter_dir: Path | None, adapter_name: str = "default"):
    """The base model with a LoRA adapter on top (or the bare base model), ready to generate.
    More adapters can be loaded beside the first under other names (`model.load_adapter`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_checkpoint(base_dir)
    if adapter_dir is not None:
        require_checkpoint(adapter_dir, "adapter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or base_dir)
    tokenizer.padding_side = "left"  # generation continues each row from its last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def generate_answers(
    model, tokenizer, prompts: list[Chat], max_new_tokens: int, batch_size: int,
    progress: Callable[[str], None] | None = None, batch_seconds: list[float] | None = None,
    max_time: float | None = None, grammars: list | None = None,
) -> list[tuple[str, float]]:
    """(answer, confidence) per prompt, in the order of `prompts`, generated greedily in batches;
    each batch's wall time is appended to `batch_seconds` when given. `max_time`: seconds after
    which a batch stops generating (its answers are cut there). `grammars`: each prompt's compiled
    answer grammar (`pipeline.structured`; None: unconstrained).

    Two things make this several times faster than batching the prompts as they come, with the
    same answers: prompts are batched by length, so little is spent on padding; and the calls of
    one cluster share their system prompt (and often their tools), so the part every prompt of a
    batch starts with is run through the model once and its KV cache shared by the batch.
    """
    token_ids = [tokenizer(render_prompt(tokenizer, chat), add_special_tokens=False)["input_ids"] for chat in prompts]
    by_length = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    results: list[tuple[str, float] | None] = [None] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        started = time.perf_counter()
        rows = by_length[start : start + batch_size]
        answers = _generate_batch(model, tokenizer, [token_ids[i] for i in rows], max_new_tokens, max_time,
                                  [grammars[i] for i in rows] if grammars else [])
        for row, answer in zip(rows, answers):
            results[row] = answer
        if batch_seconds is not None:
            batch_seconds.append(time.perf_counter() - started)
        if progress:
            progress(f"generated {min(start + batch_size, len(prompts))}/{len(prompts)} answers")
    return results


def _shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all sequences share, leaving each at least one of its own (the
    last prompt token must go through `generate` to give the first answer token)."""
    shortest = min(len(s) for s in sequences) - 1
    length = 0
    while length < shortest and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


# Rows whose own parts are this close in length are prefilled together (padded to the longest);
# a longer one starts a group of its own, so that little of the prefill is spent on padding.
PREFILL_GROUP_SLACK = 1.25
PREFILL_GROUP_MIN_WIDTH = 16


def _prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped by similar length, shortest first: a group is widened by a row as long
    as that row is at most 25% (or 16 tokens) longer than the group's shortest."""
    groups: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda r: lengths[r]):
        if groups and lengths[row] <= max(lengths[groups[-1][0]] * PREFILL_GROUP_SLACK, PREFILL_GROUP_MIN_WIDTH):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def cache_keyword(model) -> str:
    """The keyword a model's forward and `generate` take a KV cache by: `cache` since
    transformers 5.2x renamed it, `past_key_values` before (5.40 drops the old name)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes it on
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _prefilled_cache(model, sequences: list[list[int]], shared: int, width: int, pad_token_id: int):
    """The KV cache of every prompt but its last token, laid out as the batch's left padding
    wants it: the shared prefix (run once), then each row's own tokens right-aligned in `width`.

    Rows are run in groups of similar length, so that prompts of very different lengths (tool
    calls carry 200 to 2,000 tokens of tool schemas) do not pay to run the padding through the
    model. Positions of padding are masked in the batch, so what they hold does not matter.
    Where the rows make one group, the cache holds the shared prefix alone (or is None) and
    `generate` runs the rest of the prompts, padded as little."""
    import torch
    from transformers import DynamicCache

    keyword = cache_keyword(model)
    prefix = None
    if shared:
        prefix = DynamicCache(config=model.config)
        # only the cache is wanted: logits of the last position alone, not the whole prefix's
        model(input_ids=torch.tensor([sequences[0][:shared]], device=model.device), **{keyword: prefix},
              use_cache=True, logits_to_keep=1)
    own = [s[shared:-1] for s in sequences]
    groups = _prefill_groups([len(o) for o in own])
    layers = len(prefix.layers) if prefix is not None else model.config.num_hidden_layers
    keys: list[torch.Tensor | None] = [None] * layers
    values: list[torch.Tensor | None] = [None] * layers
    # One group: `generate` runs the rows' own parts with as little padding; leave them to it.
    for group in groups if len(groups) > 1 else []:
        group_width = max(len(own[row]) for row in group)
        if not group_width:
            continue
        ids = torch.full((len(group), group_width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), shared + group_width), dtype=torch.long)
        mask[:, :shared] = 1
        for i, row in enumerate(group):
            if own[row]:
                ids[i, group_width - len(own[row]) :] = torch.tensor(own[row])
                mask[i, shared + group_width - len(own[row]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache = DynamicCache(config=model.config)
        if prefix is not None:
            for layer, prefix_layer in enumerate(prefix.layers):
                cache.update(prefix_layer.keys.expand(len(group), -1, -1, -1).contiguous(),
                             prefix_layer.values.expand(len(group), -1, -1, -1).contiguous(), layer)
        model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), position_ids=positions.to(model.device),
              **{keyword: cache}, use_cache=True, logits_to_keep=1)
        rows = torch.tensor(group, device=model.device)
        for layer, group_layer in enumerate(cache.layers):
            if keys[layer] is None:
                heads, head_dim = group_layer.keys.shape[1], group_layer.keys.shape[3]
                shape = (len(sequences), heads, shared + width, head_dim)
                keys[layer] = group_layer.keys.new_zeros(shape)
                values[layer] = group_layer.values.new_zeros(shape)
                if prefix is not None:
                    keys[layer][:, :, :shared] = prefix.layers[layer].keys
                    values[layer][:, :, :shared] = prefix.layers[layer].values
            keys[layer][rows, :, shared + width - group_width :] = group_layer.keys[:, :, shared:]
            values[layer][rows, :, shared + width - group_width :] = group_layer.values[:, :, shared:]
    if keys[0] is None:  # one group, or nothing of their own but the last token: the prefix alone, repeated
        if prefix is not None:
            prefix.batch_repeat_interleave(len(sequences))
        return prefix
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        cache.update(keys[layer], values[layer], layer)
    return cache


def _room_for_answers(model, cache, length: int):
    """The prefilled cache (or none) moved into one allocated once for the prompts and the whole
    answer budget: `generate` then writes each new token's keys and values in place. A growing
    cache concatenates all of its layers' keys and values again for every token, which on tool
    calls (prompts of up to 2,000 tokens) was a third of the decoding time on a CPU."""
    from transformers import StaticCache

    room = StaticCache(config=model.config, max_cache_len=length)
    for layer, filled in zip(room.layers, cache.layers if cache is not None else []):
        layer.update(filled.keys, filled.values)
    return room


def _generate_batch(
    model, tokenizer, sequences: list[list[int]], max_new_tokens: int, max_time: float | None = None,
    grammars: list | None = None,
) -> list[tuple[str, float]]:
    """Greedy answers with confidences for one batch of tokenized prompts. The shared prefix is
    encoded once; each row's own rest is left-padded after it (the attention mask hides the
    padding and positions follow the mask, so every row sees exactly its own prompt). All but
    the last prompt token go through the model before `generate` (`_prefilled_cache`), without
    running the padding, into a cache with room for the answers (`_room_for_answers`).

    A row with a grammar is decoded within it. Its confidence is read from the constrained
    distribution over the tokens where the grammar left a choice: a token it forced (the
    `<tool_call>` tag, a key's quotes) says nothing of how sure the model is."""
    import torch

    from pipeline.structured import forced_steps, logits_processor

    shared = _shared_prefix_length(sequences)
    rest = max(len(s) - shared for s in sequences)
    input_ids = torch.full((len(sequences), shared + rest), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        own = len(sequence) - shared
        input_ids[row, :shared] = torch.tensor(sequence[:shared])
        input_ids[row, shared + rest - own :] = torch.tensor(sequence[shared:])
        attention_mask[row, :shared] = 1
        attention_mask[row, shared + rest - own :] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    masks = logits_processor(grammars or [])
    with torch.inference_mode():
        cache = _prefilled_cache(model, sequences, shared, rest - 1, tokenizer.pad_token_id)
        cache = _room_for_answers(model, cache, shared + rest + max_new_tokens)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **{cache_keyword(model): cache},
            max_new_tokens=max_new_tokens,
            max_time=max_time,
            # transformers compiles the decoding of a generation that uses a preallocated cache on a
            # GPU; each batch here has shapes of its own (rows, prompt width, budget), so that
            # would compile again and again
            disable_compile=True,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=[masks] if masks is not None else None,
        )
    new_tokens = out.sequences[:, input_ids.shape[1] :]
    log_probs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    had_choice = (~forced_steps(masks, tokenizer, new_tokens, out.scores) if masks is not None
                  else torch.ones_like(log_probs, dtype=torch.bool))
    answers = []
    for row in range(len(sequences)):
        tokens = new_tokens[row].tolist()
        length = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else len(tokens)
        chosen = log_probs[row, :length][had_choice[row, :length]].float()
        mean_log_prob = float(chosen.mean()) if len(chosen) else (0.0 if length else -math.inf)
        answers.append((tokenizer.decode(tokens[:length], skip_special_tokens=True).strip(), math.exp(mean_log_prob)))
    return answers


@contextmanager
def base_model_only(model):
    """The model without any adapter while answering (a bare base model as it is)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        yield model


@contextmanager
def lora_merged(model):
    """The LoRA adapter's weights folded into the base weights while answering: the same
    function with one matrix product per layer instead of three (on a CPU the small products of
    an unmerged adapter cost a quarter of the time), taken back out afterwards so that the base
    model stays available for the other arms. Only in float32, where taking them out restores
    the base weights to rounding error; bfloat16 would not."""
    import torch
    from peft import PeftModel

    if not isinstance(model, PeftModel) or model.dtype != torch.float32:
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def call_grammars(model, tokenizer, answer_format: dict | None, calls: pd.DataFrame) -> list | None:
    """Each call's compiled answer grammar (`pipeline.structured`), or None for free answers."""
    from pipeline.structured import FREE, AnswerGrammars

    if not answer_format or answer_format.get("shape", FREE) == FREE:
        return None
    return AnswerGrammars(tokenizer, model.config.vocab_size).for_calls(answer_format, list(calls["tools"]))


def answer_token_budget(tokenizer, answers: list[str], cap: int) -> int:
    """Room for the longest answer the baseline gave, plus a margin, within a cap."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=16)
    return int(min(cap, longest * 1.25 + 8))


def prompts_of(calls: pd.DataFrame, native_tools: bool) -> list[Chat]:
    """Each call's prompt as the model sees it."""
    return [chat_of_call(m, t, native_tools) for m, t in zip(calls["messages"], calls["tools"])]


def solved_examples(calls: pd.DataFrame, native_tools: bool) -> list[tuple[Chat, dict]]:
    """Each call's prompt with the answer the LLM gave: examples for an in-context prompt."""
    return [solved_call(m, t, r, native_tools) for m, t, r in zip(calls["messages"], calls["tools"], calls["response_message"])]


def mean_score(model, tokenizer, prompts: list[Chat], calls: pd.DataFrame, budget: int, batch_size: int,
               grammars: list | None = None) -> float:
    """Mean score against the logged answers of `calls` of the model's answers to `prompts`,
    each decoded within its grammar where given (`call_grammars`)."""
    answers = generate_answers(model, tokenizer, prompts, budget, batch_size, grammars=grammars)
    baselines = [baseline_answer(r) for r in calls["response_message"]]
    return round(float(np.mean([score_answer(b, a, t)[1] for b, (a, _), t in zip(baselines, answers, calls["tools"])])), 4)


def score_holdout(holdout: pd.DataFrame, generated: list[tuple[str, float]], judge: Judge | None = None) -> pd.DataFrame:
    """Each answer scored against the logged one by its shape's scorer; free text by the LLM
    judge instead where one is configured."""
    rows = []
    for (_, call), (answer, confidence) in zip(holdout.iterrows(), generated):
        baseline = baseline_answer(call["response_message"])
        scorer, score = score_answer(baseline, answer, call["tools"])
        if judge is not None and scorer == FREE_TEXT:
            request = signature_parts(call["messages"], call["tools"])[2]
            scorer, score = LLM_JUDGE, judge.score(request, baseline, answer)
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


def calibrate_threshold(scored: pd.DataFrame, quality_floor: float,
                        confidence: float | None = None) -> tuple[float | None, float]:
    """(threshold, coverage): the lowest confidence at which the answers at or above it
    average at least the quality floor, and the share of calls the SLM then answers.

    With `confidence` (promotion's, e.g. 0.95) the answers kept must clear the floor by their
    lower confidence bound, not by their mean: the threshold that puts the mean right at the
    floor puts the test calls' bound below it, so promotion could never follow from it.

    None means no threshold reaches the floor: every call would be escalated.
    """
    if scored.empty:
        return None, 0.0
    from pipeline.promote import quality_lower_bound

    ordered = scored.sort_values("confidence", ascending=False)
    running_mean = ordered["score"].expanding().mean().to_numpy()
    if confidence is not None:
        running_mean = np.array([quality_lower_bound(m, n, confidence) for n, m in enumerate(running_mean, start=1)])
    meets = np.flatnonzero(running_mean >= quality_floor)
    if len(meets) == 0:
        return None, 0.0
    last = meets[-1]
    return float(ordered["confidence"].iloc[last]), float((last + 1) / len(ordered))


def split_for_calibration(scored: pd.DataFrame, calibration_share: float) -> pd.Series:
    """CALIBRATION for the earlier `calibration_share` of the (time-ordered) held-out calls, TEST
    for the rest; each part gets at least one call when there are two or more."""
    n = len(scored)
    n_calibration = min(max(int(round(n * calibration_share)), 1), n - 1) if n >= 2 else 0
    return pd.Series([CALIBRATION] * n_calibration + [TEST] * (n - n_calibration), index=scored.index)


def coverage_curve(scored: pd.DataFrame) -> pd.DataFrame:
    """For each confidence threshold that changes the answered set: coverage and mean score of
    the answered calls (highest confidence first)."""
    ordered = scored.sort_values("confidence", ascending=False)
    curve = pd.DataFrame({
        "threshold": ordered["confidence"].to_numpy(),
        "coverage": np.arange(1, len(ordered) + 1) / max(len(ordered), 1),
        "score": ordered["score"].expanding().mean().to_numpy(),
    })
    return curve.groupby("threshold", sort=False).last().reset_index()  # ties answer together


def feedback_accuracy(scored: pd.DataFrame) -> dict | None:
    """Accuracy against the agent's outcome feedback, on the calls that have it.

    The baseline is right where feedback says "correct". The SLM is counted right only where it
    gives that confirmed answer (score 1 against the baseline): where the baseline was wrong the
    right answer is not in the log, so the SLM's accuracy here is a lower bound. Also counted:
    how often the SLM repeats an answer the feedback marked wrong.
    """
    judged = scored[scored["feedback"].isin(["correct", "incorrect"])]
    if judged.empty:
        return None
    correct = judged["feedback"] == "correct"
    agrees = judged["score"] >= 1.0
    return {
        "calls_with_feedback": int(len(judged)),
        "baseline_accuracy": round(float(correct.mean()), 4),
        "slm_accuracy_lower_bound": round(float((correct & agrees).mean()), 4),
        "slm_repeats_known_wrong_answers": int((~correct & agrees).sum()),
    }


def summarize_scores(scored: pd.DataFrame, quality_floor: float, threshold_confidence: float | None = None) -> dict:
    """The cluster's figures from its scored held-out answers (with their `split` column); the
    threshold is calibrated with `threshold_confidence` (see `calibrate_threshold`)."""
    calibration, test = scored[scored["split"] == CALIBRATION], scored[scored["split"] == TEST]
    threshold, _ = calibrate_threshold(calibration, quality_floor, threshold_confidence)
    answered = test[test["confidence"] >= threshold] if threshold is not None else test.iloc[0:0]
    mean = lambda frame: round(float(frame["score"].mean()), 4) if len(frame) else None  # noqa: E731
    return {
        "holdout_calls": int(len(scored)),
        "calibration_calls": int(len(calibration)),
        "test_calls": int(len(test)),
        "score_vs_baseline": mean(test) or 0.0,
        "exact_agreement": round(float((test["score"] == 1.0).mean()), 4) if len(test) else 0.0,
        "scorers": scored["scorer"].value_counts().to_dict(),
        "confidence_threshold": threshold,
        "coverage_at_threshold": round(len(answered) / len(test), 4) if len(test) else 0.0,
        "score_at_threshold": mean(answered),
        "answered_at_threshold": int(len(answered)),
        "feedback": feedback_accuracy(test),
    }


def percentiles_ms(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    return {"p50": round(float(np.percentile(seconds, 50)) * 1000, 1), "p95": round(float(np.percentile(seconds, 95)) * 1000, 1)}


def cost_and_speed(calls: pd.DataFrame, batch_seconds: list[float], batch_size: int, single_seconds: list[float],
                   prices: Prices) -> dict:
    """Latency and cost per 1,000 calls of the SLM (measured here) and of the LLM (its logged
    latency and token usage, at the configured prices)."""
    per_call = sum(batch_seconds) / max(len(calls), 1)  # batched throughput: the serving cost
    # each call of a batch waits for the whole batch
    batched_latency = [s for s, start in zip(batch_seconds, range(0, len(calls), batch_size))
                       for _ in range(min(batch_size, len(calls) - start))]
    slm_cost = prices.slm_hardware_per_hour / 3600 * per_call * 1000
    tokens = calls[["prompt_tokens", "completion_tokens"]].astype("float64")
    llm_cost = (tokens["prompt_tokens"].mean() * prices.llm_input_per_million_tokens
                + tokens["completion_tokens"].mean() * prices.llm_output_per_million_tokens) / 1e6 * 1000
    logged = calls["latency_ms"].dropna().astype(float) / 1000
    return {
        "slm_latency_ms_batch_1": percentiles_ms(single_seconds),
        f"slm_latency_ms_batch_{batch_size}": percentiles_ms(batched_latency),
        "slm_seconds_per_call_batched": round(per_call, 4),
        "llm_logged_latency_ms": percentiles_ms(list(logged)),
        "slm_cost_per_1000_calls": round(slm_cost, 4),
        "llm_cost_per_1000_calls": round(float(llm_cost), 4) if not math.isnan(llm_cost) else None,
        "cost_ratio_llm_to_slm": round(float(llm_cost / slm_cost), 1) if slm_cost > 0 and not math.isnan(llm_cost) else None,
    }


def base_model_arms(model, tokenizer, calls: pd.DataFrame, train: pd.DataFrame, budget: int,
                    settings: GenerationSettings, grammars: list | None = None) -> dict:
    """Mean score against the baseline of the base SLM without its adapter, zero-shot and with
    retrieved training calls as examples (in-context), on `calls`, decoded in the same format as
    the adapter: what fine-tuning bought."""
    native_tools = renders_tools(tokenizer)
    arms = {"base_zero_shot": prompts_of(calls, native_tools)}
    if settings.shots:  # 0: the base SLM with retrieved examples is measured as a kind of its own
        arms["base_in_context"] = ExampleBank.of_calls(train, settings.shots).prompts(
            list(calls["messages"]), list(calls["tools"]), native_tools)
    with model.disable_adapter():
        return {arm: mean_score(model, tokenizer, arm_prompts, calls, budget, settings.batch_size, grammars)
                for arm, arm_prompts in arms.items()}


def evaluate_cluster(
    model, tokenizer, holdout: pd.DataFrame, train: pd.DataFrame, quality_floor: float,
    settings: GenerationSettings, calibration_share: float = 0.5, prices: Prices | None = None,
    progress: Callable[[str], None] | None = None, judge: Judge | None = None, threshold_confidence: float | None = None,
    answer_format: dict | None = None, instructions: SharedInstructions | None = None,
    examples: ExampleBank | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Scored held-out answers (time-ordered `holdout`) and the cluster's summary figures; the
    answers are decoded in `answer_format` (the one recorded beside the adapter) where given.
    An adapter trained without the cluster's shared `instructions` answers calls without them;
    a call that does not carry them gets confidence 0, as the router would send it to the LLM.
    With `examples` it is the base model that answers (any adapter off), each call shown the
    solved calls of the bank most like it (`pipeline.incontext`), as the router would serve it."""
    if examples is not None:
        carried = [True] * len(holdout)
        prompts = examples.prompts(list(holdout["messages"]), list(holdout["tools"]), renders_tools(tokenizer))
    else:
        factored, carried = factor_out(holdout, instructions or SharedInstructions())
        prompts = prompts_of(factored, renders_tools(tokenizer))
    grammars = call_grammars(model, tokenizer, answer_format, holdout)
    budget = answer_token_budget(tokenizer, [baseline_answer(r) for r in train["response_message"]],
                                 settings.max_new_tokens_cap)
    batch_seconds: list[float] = []
    single_seconds: list[float] = []
    with base_model_only(model) if examples is not None else lora_merged(model):
        generated = generate_answers(model, tokenizer, prompts, budget, settings.batch_size, progress, batch_seconds,
                                     grammars=grammars)
        for row in range(len(prompts))[-settings.latency_calls:] if settings.latency_calls else []:  # test calls
            generate_answers(model, tokenizer, [prompts[row]], budget, 1, batch_seconds=single_seconds,
                             grammars=grammars and [grammars[row]])
    generated = [(answer, confidence if known else 0.0) for (answer, confidence), known in zip(generated, carried)]
    scored = score_holdout(holdout, generated, judge)
    scored["split"] = split_for_calibration(scored, calibration_share)
    speed = cost_and_speed(holdout, batch_seconds, settings.batch_size, single_seconds, prices or Prices())
    summary = {**summarize_scores(scored, quality_floor, threshold_confidence), "max_new_tokens": budget,
               "calls_under_other_instructions": len(carried) - sum(carried),
               "answer_format": (answer_format or {}).get("shape", "free"), "cost_and_speed": speed}
    test_rows = np.flatnonzero(scored["split"] == TEST)[-settings.arm_calls:] if settings.arm_calls else []
    if len(test_rows) and len(train) and examples is None:
        if progress:
            progress(f"base model without adapter: answering {len(test_rows)} test calls zero-shot and in-context")
        arms = base_model_arms(model, tokenizer, holdout.iloc[test_rows], train, budget, settings,
                               grammars and [grammars[row] for row in test_rows])
        summary["arms"] = {"calls": len(test_rows), **arms,
                           "fine_tuned": round(float(scored["score"].iloc[test_rows].mean()), 4)}
    return scored, summary


def snapshot_learning_curve(
    base_dir: Path, folder: Path, snapshots: list[dict], calls: pd.DataFrame, train_answers: list[str],
    settings: GenerationSettings, answer_format: dict | None = None, instructions: SharedInstructions | None = None,
) -> list[dict]:
    """A generative adapter's learning curve: the mean score against the logged answers of
    `calls` of the adapter as it was after each snapshot's step (`finetune.train_adapter`'s
    `snapshot_steps`, saved in `folder`), answered as shadow evaluation answers."""
    if not snapshots or calls.empty:
        return []
    from peft import PeftModel

    base, tokenizer = load_adapter_model(base_dir, None)  # a snapshot holds the adapter's weights alone
    first, *rest = snapshots
    model = PeftModel.from_pretrained(base, folder / f"step-{first['step']}", adapter_name=f"step-{first['step']}").eval()
    for snapshot in rest:
        model.load_adapter(folder / f"step-{snapshot['step']}", adapter_name=f"step-{snapshot['step']}")
    factored, _ = factor_out(calls, instructions or SharedInstructions())
    prompts = prompts_of(factored, renders_tools(tokenizer))
    grammars = call_grammars(model, tokenizer, answer_format, calls)
    budget = answer_token_budget(tokenizer, train_answers, settings.max_new_tokens_cap)
    curve = []
    for snapshot in snapshots:
        model.set_adapter(f"step-{snapshot['step']}")
        with lora_merged(model):
            score = mean_score(model, tokenizer, prompts, calls, budget, settings.batch_size, grammars)
        curve.append({**snapshot, "score": score})
    return curve


def evaluate_specialist(
    specialist, holdout: pd.DataFrame, quality_floor: float, settings: GenerationSettings,
    calibration_share: float = 0.5, prices: Prices | None = None, threshold_confidence: float | None = None,
) -> tuple[pd.DataFrame, dict]:
    """`evaluate_cluster` for an encoder specialist (`pipeline.encoders.Specialist`): it answers
    every held-out call's request; a call under instructions it was not trained with gets
    confidence 0, as the router would escalate it."""
    from pipeline.encoders import instructions_key, request_text

    requests = [request_text(m) for m in holdout["messages"]]
    known = set(specialist.spec.get("instructions") or [])
    batch_seconds: list[float] = []
    generated: list[tuple[str, float]] = []
    for start in range(0, len(requests), settings.batch_size):
        started = time.perf_counter()
        generated += specialist.answer(requests[start : start + settings.batch_size])
        batch_seconds.append(time.perf_counter() - started)
    single_seconds = []
    for request in requests[-settings.latency_calls:] if settings.latency_calls else []:
        started = time.perf_counter()
        specialist.answer([request])
        single_seconds.append(time.perf_counter() - started)
    carried = [instructions_key(m, t) in known for m, t in zip(holdout["messages"], holdout["tools"])]
    generated = [(answer, confidence if under_known else 0.0) for (answer, confidence), under_known in zip(generated, carried)]
    scored = score_holdout(holdout, generated)
    scored["split"] = split_for_calibration(scored, calibration_share)
    speed = cost_and_speed(holdout, batch_seconds, settings.batch_size, single_seconds, prices or Prices())
    return scored, {**summarize_scores(scored, quality_floor, threshold_confidence), "kind": specialist.kind,
                    "calls_under_other_instructions": len(carried) - sum(carried), "cost_and_speed": speed}


@contextmanager
def _figure(height: float, quality_floor: float, title: str, xlabel: str, ylabel: str, legend: str):
    """A matplotlib figure for a report, its score axis from 0 to 1 with the quality floor drawn
    across; yields (axes, out), and `out` holds the PNG bytes afterwards."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, height), dpi=100)
    out = io.BytesIO()
    yield axes, out
    axes.axhline(quality_floor, color="grey", linestyle="--", linewidth=1, label=f"quality floor {quality_floor:g}")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(loc=legend, fontsize=7)
    figure.tight_layout()
    figure.savefig(out, format="png")
    plt.close(figure)


def learning_curves_png(curves: dict[str, list[dict]], quality_floor: float) -> bytes:
    """Each specialist's learning curve: mean score against the logged answers on held-out calls
    it is not tested on (an encoder's calibration calls after each pass, a generative adapter's
    earliest held-out calls at each snapshot), by the training examples seen so far. The axis is
    logarithmic: a CPU-sized generative run sees tens of calls where an encoder sees thousands."""
    with _figure(4, quality_floor, "Learning curves of the specialists", "training examples seen (log scale)",
                 "mean score vs baseline (held-out calls)", "lower right") as (axes, out):
        axes.set_xscale("log")
        for name, curve in curves.items():
            points = [p for p in curve if "score" in p]
            axes.plot([p["examples_seen"] for p in points], [p["score"] for p in points], "o-", markersize=3,
                      label=name[:50])
    return out.getvalue()


def coverage_quality_png(scored: pd.DataFrame, summaries: dict[tuple[int, str], dict], labels: dict[int, str],
                         quality_floor: float) -> bytes:
    """The coverage/quality curve of each cluster's candidate (its `kind`) on its test calls
    (dashed: calibration calls), with the calibrated threshold marked and the quality floor drawn
    across; `summaries` by (cluster, kind)."""
    with _figure(4.5, quality_floor, "Coverage and quality by confidence threshold (dot: calibrated threshold)",
                 "coverage (share of test calls the SLM answers)", "mean score vs baseline of answered calls",
                 "lower left") as (axes, out):
        for index, ((cluster_id, kind), frame) in enumerate(scored.groupby(["cluster_id", "kind"], sort=True)):
            colour = f"C{index % 10}"
            for split, style in ((TEST, "-"), (CALIBRATION, ":")):
                part = frame[frame["split"] == split]
                if part.empty:
                    continue
                curve = coverage_curve(part)
                name = f"{cluster_id} {kind}: {labels.get(cluster_id, '')}"[:44] if split == TEST else None
                axes.plot(curve["coverage"], curve["score"], style, color=colour, drawstyle="steps-post", label=name)
            summary = summaries.get((cluster_id, kind), {})
            if summary.get("confidence_threshold") is not None and summary.get("score_at_threshold") is not None:
                axes.plot(summary["coverage_at_threshold"], summary["score_at_threshold"], "o", color=colour, markersize=8)
        axes.set_xlim(0, 1.02)
    return out.getvalue()
