"""Step 5, fine-tuning: one LoRA adapter per chosen cluster, trained on its logged answers.

Shaped like TRL's `sft.py`: a dataset, `SFTConfig`, a PEFT `LoraConfig` and `SFTTrainer`. Each
cluster's calls are split by time first: the latest ones are held out for shadow evaluation
and never trained on. Then, in `train_adapter`:

1. every call goes through the model's own chat template (`tokenize_examples`), with a mask
   on the logged answer, the only tokens the loss covers;
2. TRL packs the calls best-fit into rows of `max_length` tokens and trains padding-free:
   `packed_attention` keeps each call's attention inside the call with a variable-length
   flash kernel, which is what makes it fast on a GPU (bench/README.md has the profile), and
   TRL's LM head scores only the answers, on CPU too (`lm_head_on_answers`);
3. checkpoints are written as it goes, and a killed run resumes from the last one;
4. the adapter, its tokenizer, metrics and model card are written aside and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from pipeline import failpoints
from pipeline.calls import (
    INSTRUCTIONS_FILE, SharedInstructions, answer_message, baseline_answer, chat_of_call, factor_out, renders_tools,
    shared_instructions,
)
from pipeline.models import require_checkpoint
from pipeline.store import replace_folder
from pipeline.structured import write_answer_format

PACKED_ATTENTION = "packed"
ANSWERS_ONLY = "answers"


@dataclass
class TrainSettings:
    """Training knobs. The defaults fit a short CPU run; configs/gpu.yaml raises them for a GPU.

    Training is padding-free: the calls are packed best-fit into rows of `max_length` tokens,
    `batch_size` rows make a step, and each call attends only to itself (`packed_attention`),
    so no step computes on padding.
    """

    max_steps: int = 30
    batch_size: int = 2  # packed rows of max_length tokens per step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 768
    seed: int = 0
    quantization: str = "none"  # "4bit" for QLoRA (CUDA only)
    # "liger": Liger's fused RMSNorm, SwiGLU and RoPE kernels (CUDA, `pip install liger-kernel`);
    # "none": the model's own; "auto": Liger where it can run.
    kernels: str = "auto"
    compile: bool = False  # torch.compile each decoder layer (CUDA; pays off on long runs)
    # "packed": variable-length attention inside each packed call (`packed_attention`);
    # "flex_attention" or "sdpa": transformers' own, given the packed calls' position ids.
    attention: str = PACKED_ATTENTION
    # "answers": TRL's fused LM head scores only the positions the loss covers, on CPU as on
    # CUDA (`lm_head_on_answers`); "trl": TRL's own choice, which scores every position on CPU.
    lm_head: str = ANSWERS_ONLY
    # Recompute each decoder layer's activations in backward instead of keeping them: for base
    # models or steps whose activations do not fit in GPU memory. Same loss and gradients, slower.
    gradient_checkpointing: bool = False
    logging_steps: int = 0  # loss and speed logged every this many steps; 0: ten times a run
    save_steps: int = 0  # a checkpoint every this many steps (resume point); 0: every tenth, >= 10
    # Decode the adapter's answers only in the shape of the cluster's logged answers
    # (`pipeline.structured`): recorded beside the adapter, followed by shadow evaluation and router.
    structured_decoding: bool = True
    # Train without the system prompt (and tool list) all calls of the cluster share: the adapter
    # learns them, and every step sees several times more examples (recorded beside the adapter;
    # the router then serves only calls that carry them, `calls.SharedInstructions`).
    factor_instructions: bool = True


def learning_rate_for(params_millions: int) -> float:
    """LoRA learning rate by base-model size: tiny models take larger steps; 2e-4 is the usual
    LoRA/QLoRA rate for 1-7B models, halved above that size's lower half."""
    if params_millions <= 500:
        return 5e-4
    return 2e-4 if params_millions <= 2000 else 1e-4


def settings_for_model(overrides: dict, params_millions: int, context_length: int) -> TrainSettings:
    """TrainSettings for one base model: what a run config sets, the size-dependent defaults for
    what it leaves at 0 (learning rate), and max_length within the model's context."""
    fields = {k: v for k, v in overrides.items() if k in TrainSettings.__dataclass_fields__}
    if not fields.get("learning_rate"):
        fields["learning_rate"] = learning_rate_for(params_millions)
    fields["max_length"] = min(fields.get("max_length", TrainSettings.max_length), context_length)
    return TrainSettings(**fields)


@dataclass
class SplitSettings:
    """The time split between training and shadow-evaluation calls of a cluster."""

    holdout_fraction: float = 0.2
    min_holdout: int = 10
    max_holdout: int = 200


def split_by_time(calls: pd.DataFrame, settings: SplitSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout): the latest calls are held out, as they would arrive after training.

    Calls marked not trainable (their answer was reported wrong) are left out of training but
    stay in the holdout: the shadow evaluation should see the agent's real traffic.
    """
    ordered = calls.sort_values(["called_at", "trace_id"], kind="stable")
    n_holdout = int(round(len(ordered) * settings.holdout_fraction))
    n_holdout = min(max(n_holdout, settings.min_holdout), settings.max_holdout, len(ordered) // 2)
    train, holdout = ordered.iloc[: len(ordered) - n_holdout], ordered.iloc[len(ordered) - n_holdout :]
    if "trainable" in train.columns:
        train = train[train["trainable"].astype(bool)]
    return train, holdout


def training_examples(calls: pd.DataFrame, native_tools: bool = False) -> list[dict]:
    """Conversational prompt/completion pairs (and tools, where the model's template renders
    them): the loss goes on the completion, the logged answer, only."""
    examples = []
    for m, t, r in zip(calls["messages"], calls["tools"], calls["response_message"]):
        chat = chat_of_call(m, t, native_tools)
        examples.append({"prompt": chat.messages, "completion": [answer_message(json.loads(r), native_tools)],
                         "tools": chat.tools})
    return examples


def _mean_prompt_tokens(tokenized: list[dict]) -> float:
    return sum(len(t["input_ids"]) - sum(t["completion_mask"]) for t in tokenized) / max(len(tokenized), 1)


def tokenize_examples(tokenizer, examples: list[dict]) -> list[dict]:
    """Token ids of each example through the model's own chat template, with a mask of the
    answer's tokens (its end-of-turn token included, so the model learns to stop)."""
    tokenized = []
    for example in examples:
        prompt = tokenizer.apply_chat_template(example["prompt"], tools=example["tools"], tokenize=True,
                                               add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tools=example["tools"],
                                             tokenize=True, return_dict=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template renders a prompt differently once the answer follows it; "
                             "training needs the prompt's tokens to be a prefix of the whole call's")
        tokenized.append({"input_ids": full, "completion_mask": [0] * len(prompt) + [1] * (len(full) - len(prompt))})
    return tokenized


def calls_cut_by_max_length(tokenized: list[dict], max_length: int) -> tuple[int, int]:
    """(calls whose answer is cut short, calls with no answer token left) at this max_length.

    Packing truncates each call to max_length tokens, prompt first: a call whose prompt alone
    fills the row trains on nothing, silently. This counts them so a run can say so.
    """
    cut = sum(len(t["input_ids"]) > max_length for t in tokenized)
    lost = sum(t["completion_mask"].index(1) >= max_length if 1 in t["completion_mask"] else True for t in tokenized)
    return cut, lost


def training_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- Packed attention -------------------------------------------------------------------------
# A padding-free batch is one long row holding many calls back to back. Plain SDPA would need a
# dense block-diagonal mask over the whole row (quadratic in the row's length, and it computes
# every masked block); a variable-length kernel instead runs causal attention inside each call.


def _varlen_kernel():
    """PyTorch's variable-length flash attention, where this build has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed sequence; transformers' attention-function interface.

    query/key/value are (1, heads, tokens, head_dim); `cu_seq_lens_q` (from TRL's padding-free
    collator) holds where each sequence starts. Without it (a padded batch, generation) this is
    plain SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.get("cu_seq_lens_q")
    if starts is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    heads, length, head_dim = query.shape[1], query.shape[2], query.shape[3]
    groups = heads // key.shape[1]
    q = query[0].transpose(0, 1)  # (tokens, heads, head_dim)
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    varlen = _varlen_kernel()
    if query.is_cuda and varlen is not None:
        out = _varlen_causal(varlen, q, k, v, starts, int(kwargs["max_length_q"]), scaling, groups)
    else:
        # CPU: one causal SDPA per sequence (a CPU batch holds a handful of them)
        bounds = starts.tolist()
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scaling
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a
        ])
    return out.reshape(1, length, heads, head_dim), None


def _varlen_causal(varlen, q, k, v, starts, max_length, scaling, groups):
    import inspect

    import torch

    options = inspect.signature(varlen).parameters
    kwargs = {}
    if "scale" in options:
        kwargs["scale"] = scaling
    if "window_size" in options:  # PyTorch >= 2.10 spells causal as a window
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if groups > 1 and "enable_gqa" in options:
        kwargs["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    starts = starts.to(device=q.device, dtype=torch.int32)
    return varlen(q, k, v, starts, starts, max_length, max_length, **kwargs)


def register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


# --- The LM head on CPU -----------------------------------------------------------------------
# SFTTrainer gives the model TRL's fused LM head, which projects hidden states onto the
# vocabulary in tiles and keeps only each label's log-probability (plus entropy and top-1 for
# its metrics). On CUDA it projects only the positions with a label, the answers; elsewhere it
# projects every position, so that tile shapes stay fixed for compilers that retrace on a new
# shape (`compact = _use_triton(device)` in trl/trainer/utils.py). An eager CPU run retraces
# nothing, and there the prompts' positions cost a 49k-column projection, its softmax
# statistics and their backward for nothing: their labels are masked out.


@contextmanager
def lm_head_on_answers(settings: TrainSettings):
    """While training, TRL's fused LM head scores only the answer positions on CPU too, as it
    does on CUDA. The loss and gradients are the same (only positions without a label are
    skipped); on the demo's settings CPU training runs 1.29x faster (bench/README.md).

    Yields whether the head was narrowed: not with `lm_head: trl`, nor with a TRL that no longer
    decides this through `_use_triton` (a test fails then, so the speed is not lost silently).
    """
    if settings.lm_head not in (ANSWERS_ONLY, "trl"):
        raise ValueError(f"lm_head is {settings.lm_head!r}; expected {ANSWERS_ONLY} or trl")
    try:
        from trl.trainer import utils as trl_utils

        trl_scores_answers_only = trl_utils._use_triton
    except (ImportError, AttributeError):
        trl_scores_answers_only = None
    if settings.lm_head != ANSWERS_ONLY or trl_scores_answers_only is None:
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or trl_scores_answers_only(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = trl_scores_answers_only


# --- Loading ----------------------------------------------------------------------------------


def _load_base_for_training(base_dir: Path, settings: TrainSettings, attention: str = PACKED_ATTENTION):
    import torch
    from transformers import AutoModelForCausalLM

    if attention == PACKED_ATTENTION:
        register_packed_attention()
    device = training_device()
    if settings.quantization == "4bit":
        if device != "cuda":
            raise RuntimeError("quantization: 4bit (QLoRA) needs a CUDA GPU; use quantization: none on CPU")
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        return AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=quantization, dtype=torch.bfloat16, attn_implementation=attention
        )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation=attention)


def apply_kernels(model, settings: TrainSettings) -> str:
    """Swap in fused kernels where asked and possible; returns what was applied.

    Liger's kernels are Triton autograd functions that torch.compile cannot trace, and a
    compiled layer fuses the same work itself, so "auto" means Liger only for eager runs.
    """
    cuda = training_device() == "cuda"
    if settings.kernels not in ("auto", "liger", "none"):
        raise ValueError(f"kernels is {settings.kernels!r}; expected auto, liger or none")
    if settings.kernels == "liger" and settings.compile:
        raise ValueError("kernels: liger and compile: true do not go together (Liger's kernels do not compile); "
                         "choose one (compile was the faster on an H100, see bench/README.md)")
    if settings.kernels == "liger" and not cuda:
        raise RuntimeError("kernels: liger needs a CUDA GPU; use kernels: auto or none on CPU")
    if settings.kernels == "none" or not cuda or settings.compile:
        return "none"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        if settings.kernels == "liger":
            raise RuntimeError("kernels: liger needs the liger-kernel package (`pip install -e '.[gpu]'`)") from err
        return "none"
    # The LM head is TRL's own chunked one; Liger fuses the layers' norms, MLP activation and RoPE.
    _apply_liger_kernel_to_instance(
        model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return "liger"


def decoder_layers(model) -> list:
    """The repeated decoder blocks of a (PEFT-wrapped) causal LM: the unit worth compiling."""
    import torch

    return next(m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList))


# --- Measuring --------------------------------------------------------------------------------

# Dense bf16 tensor-core peak, from the vendors' datasheets (SXM parts unless named).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "GH200": 989.4e12,
                   "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in device_name:
            return flops
    return None


def lora_training_flops(config, tokens: int, attended_pairs: int, lora_r: int) -> float:
    """Model FLOPs of LoRA training on `tokens` tokens (PaLM-style: what the math needs,
    not what a kernel recomputes).

    Frozen weights (every projection and the LM head) cost a forward and an input-gradient
    matmul: 4 FLOPs per weight per token. LoRA's A and B add the same plus their weight
    gradients: 6. Attention costs 4 * head_dim * heads per attended (query, key) pair forward,
    twice that backward; `attended_pairs` counts the causal pairs inside each packed sequence.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_out, kv_out, mlp = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    projections = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden),
                   (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    frozen = layers * sum(a * b for a, b in projections) + hidden * config.vocab_size
    lora = layers * sum(lora_r * (a + b) for a, b in projections)
    attention = 12 * layers * heads * head_dim * attended_pairs
    return tokens * (4 * frozen + 6 * lora) + attention


class TrainingMeter:
    """Counts the tokens each step trains on and times the steps: tokens/s, ETA, MFU, memory.

    It wraps the trainer's collator (to see each batch's sequence lengths) and is the trainer's
    progress callback. Speed is measured after `warmup_steps`, so one-off costs (kernel
    autotuning, compilation, the first CUDA allocations) are reported apart.
    """

    def __init__(self, max_steps: int, progress: Callable[[str], None], warmup_steps: int = 3,
                 on_checkpoint: Callable[[Path], None] | None = None):
        self.max_steps, self.progress, self.warmup_steps = max_steps, progress, warmup_steps
        self.on_checkpoint = on_checkpoint  # called with the checkpoints' folder after each save
        # (tokens, attended pairs) of each batch collated; the data loader collates one batch
        # ahead, so a step's count is the sum over the batches it consumed.
        self.batches: list[tuple[int, int]] = []
        self.batches_per_step = 1
        self.first_step = 0  # where this run starts: a resumed run starts at its checkpoint
        self.marks: dict[int, tuple[float, int, int]] = {}

    def through(self, step: int) -> tuple[int, int]:
        """(tokens, attended pairs) this run trained on up to the end of `step`."""
        consumed = self.batches[: (step - self.first_step) * self.batches_per_step]
        return sum(t for t, _ in consumed), sum(p for _, p in consumed)

    @property
    def tokens(self) -> int:
        return self.marks[max(self.marks)][1] if self.marks else 0

    def attach(self, trainer):
        from transformers import TrainerCallback

        meter, collate = self, trainer.data_collator

        def counting_collator(examples):
            batch = collate(examples)
            if "cu_seq_lens_q" in batch:
                lengths = batch["cu_seq_lens_q"].diff().tolist()
            elif "attention_mask" in batch:
                lengths = batch["attention_mask"].sum(dim=1).tolist()
            else:
                lengths = [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
            meter.batches.append((sum(lengths), sum(n * (n + 1) // 2 for n in lengths)))
            return batch

        class Progress(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter.first_step = state.global_step
                meter.mark(state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (meter.first_step + meter.warmup_steps, meter.max_steps):
                    meter.mark(state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    meter.report(state.global_step, logs["loss"])

            def on_save(self, args, state, control, **kwargs):
                if meter.on_checkpoint:
                    meter.on_checkpoint(Path(args.output_dir))
                failpoints.reached("finetune:checkpoint-saved")  # a killed run resumes from it

        trainer.data_collator = counting_collator
        trainer.add_callback(Progress())
        self.batches_per_step = trainer.args.gradient_accumulation_steps
        self.config = trainer.model.config
        return self

    def mark(self, step: int):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # device work is asynchronous: only time finished steps
        self.marks[step] = (time.perf_counter(), *self.through(step))

    def report(self, step: int, loss: float):
        started = self.marks[self.first_step][0]
        elapsed = time.perf_counter() - started
        eta = elapsed / max(step - self.first_step, 1) * (self.max_steps - step)
        tokens, _ = self.through(step)
        self.progress(
            f"step {step}/{self.max_steps}, loss {loss:.3f}, {tokens / elapsed:,.0f} tokens/s, ETA {eta:.0f}s"
        )

    def summary(self, lora_r: int) -> dict:
        import torch

        end_step = max(self.marks)
        start_step = self.first_step + self.warmup_steps
        start_step = start_step if start_step in self.marks and start_step < end_step else self.first_step
        (t0, tokens0, pairs0), (t1, tokens1, pairs1) = self.marks[start_step], self.marks[end_step]
        seconds, tokens = t1 - t0, tokens1 - tokens0
        flops = lora_training_flops(self.config, tokens, pairs1 - pairs0, lora_r)
        measured = {
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "timed_steps": f"{start_step + 1}-{end_step}",
            "model_tflops_per_second": round(flops / seconds / 1e12, 2) if seconds > 0 else None,
        }
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            peak = peak_flops(name)
            measured["gpu"] = name
            measured["mfu"] = round(flops / seconds / peak, 4) if peak and seconds > 0 else None
            measured["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return measured


# --- Training ---------------------------------------------------------------------------------


def sft_config(output_dir: Path, settings: TrainSettings, **overrides):
    """TRL's SFTConfig for our runs: completion-only loss on packed, padding-free rows."""
    from trl import SFTConfig

    device = training_device()
    options = dict(
        output_dir=str(output_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.max_steps // 10),
        logging_steps=settings.logging_steps or max(1, settings.max_steps // 10),
        max_length=settings.max_length,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    # TRL recomputes activations by default; we keep them unless asked (SmolLM2-135M's took
    # 26.6 GiB at ~31k tokens a step on an H100, bench/README.md): recomputing only costs time
    # where they fit. transformers 5 renamed the option (the old name still works, with a warning).
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ else "gradient_checkpointing"
    options[checkpointing] = settings.gradient_checkpointing
    options.update(overrides)
    return SFTConfig(**options)


class TrainingOutOfMemory(RuntimeError):
    """The GPU ran out of memory during training; the message says which settings to change."""


@contextmanager
def out_of_memory_explained(settings: TrainSettings, base_model: str):
    """A CUDA out-of-memory error during training, turned into one that names the settings that
    make a step fit, instead of PyTorch's allocator advice alone."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()) if torch.cuda.is_available() else None
        on = f" on {gpu.name} ({gpu.total_memory / 2**30:.0f} GiB)" if gpu else ""
        advice = [
            "set gradient_checkpointing: true (activations recomputed in backward; same results, slower)"
            if not settings.gradient_checkpointing else "",
            "lower batch_size, raising gradient_accumulation_steps to keep the tokens a step",
            "lower max_length",
            "set quantization: 4bit (QLoRA)" if settings.quantization != "4bit" else "",
        ]
        raise TrainingOutOfMemory(
            f"out of GPU memory training {base_model} with {settings.batch_size} rows of {settings.max_length} "
            f"tokens a step{on}. To fit: {'; or '.join(a for a in advice if a)}. "
            f"PyTorch said: {str(err).splitlines()[0] if str(err) else 'out of memory'}"
        ) from err


def lora_config(settings: TrainSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def training_fingerprint(base_model: str, train_ids: list[str], settings: TrainSettings) -> str:
    """Changes whenever a cluster's training data or settings change: an adapter (or a half-done
    run's checkpoint) with the same fingerprint is the one this training would produce."""
    payload = json.dumps([base_model, sorted(train_ids), asdict(settings)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resumable_checkpoint(checkpoints: Path, fingerprint: str) -> Path | None:
    """The last checkpoint a killed run of the same training left, if any; checkpoints of any
    other training (data or settings changed since) are removed."""
    marker = checkpoints / "fingerprint"
    if checkpoints.exists() and (not marker.is_file() or marker.read_text().strip() != fingerprint):
        shutil.rmtree(checkpoints)
    saved = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    # a checkpoint is complete once the trainer state, written last, is there
    complete = [c for c in saved if (c / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


@dataclass
class ModelCard:
    """What an adapter's README says about where it came from (no training examples)."""

    base_model: str
    licence: str
    task: str  # the cluster's label
    cluster_id: int


def _instructions_line(metrics: dict) -> str:
    tokens = metrics.get("prompt_tokens_per_call") or {}
    if not tokens or tokens["trained_on"] == tokens["with_instructions"]:
        return "- Trained on the calls' whole prompts.\n"
    return (f"- Trained without the instructions all the cluster's calls share ({INSTRUCTIONS_FILE}): "
            f"{tokens['with_instructions']} -> {tokens['trained_on']}\n  prompt tokens per call; it answers only calls "
            f"that carry them ({metrics['calls_under_other_instructions']} training calls did not).\n")


def write_model_card(adapter_dir: Path, card: ModelCard, metrics: dict) -> None:
    settings = metrics["settings"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    first, last = metrics.get("first_called_at", "?"), metrics.get("last_called_at", "?")
    tokens = f"{metrics['tokens']:,} tokens"
    resumed = (f" (resumed from a checkpoint at step {metrics['resumed_from_step']}; {tokens} trained on after it)"
               if metrics.get("resumed_from_step") else f", {tokens} trained on")
    text = f"""---
base_model: {card.base_model}
library_name: peft
license: {card.licence.lower()}
tags: [slm-convert, lora]
---
# LoRA adapter for task cluster {card.cluster_id}: {card.task}

Trained by slm-convert to take over this step of an agent from the frontier model that served
it. Whether it may answer live traffic is decided by shadow evaluation and the promotion gate,
not by this card.

## Data
- {metrics["train_calls"]} logged calls of the cluster, {first} to {last}; the cluster's latest
  calls are held out for evaluation and were not trained on.
- {metrics["steps"]} steps{resumed}; {metrics["calls_cut_by_max_length"]} calls
  longer than max_length {settings["max_length"]} had their answers cut.
- Curated before training: personal data and secrets replaced by typed placeholders,
  duplicates and calls with errored, truncated or rejected answers removed. This card holds no
  training example.
{_instructions_line(metrics)}
## Training
- Base model: {card.base_model} (licence: {card.licence}); LoRA on all linear layers;
  loss on the logged answers only.
- Device: {metrics["device"]}{", " + metrics["gpu"] if metrics.get("gpu") else ""}; {metrics["seconds"]} s;
  {metrics["tokens_per_second"]} tokens/s; loss {metrics["first_loss"]} -> {metrics["final_loss"]}.

| setting | value |
|---|---|
{rows}
"""
    (adapter_dir / "README.md").write_text(text)


def merge_adapter(base_dir: Path, adapter_dir: Path, target: Path) -> Path:
    """The base model with the adapter folded into its weights, for servers without LoRA.

    Merged from a full-precision copy of the base, also after QLoRA (4-bit weights cannot hold
    the sum); written aside and renamed like the adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
    replace_folder(staging, target)
    return target


def snapshot_folder(output_dir: Path) -> Path:
    """Where `train_adapter` saves the adapter as it is at chosen steps (beside the adapter)."""
    return output_dir.parent / f".{output_dir.name}.snapshots"


def _snapshot_callback(steps: set[int], folder: Path):
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in steps:
                model.save_pretrained(folder / f"step-{state.global_step}")

    return Snapshots()


def train_adapter(
    base_dir: Path,
    train_calls: pd.DataFrame,
    output_dir: Path,
    settings: TrainSettings,
    progress: Callable[[str], None] = print,
    warmup_steps: int = 3,
    callbacks: list | tuple = (),
    card: ModelCard | None = None,
    fingerprint: str | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    snapshot_steps: tuple[int, ...] = (),
) -> dict:
    """Train one LoRA adapter; returns training metrics. The adapter lands in output_dir.
    `on_checkpoint(folder)` runs after each checkpoint is saved (the asset uploads it).
    After each of `snapshot_steps` the adapter as it is then is saved in `snapshot_folder(output_dir)`
    (`step-N`), for a learning curve; metrics["snapshots"] says how many calls each had seen.

    Checkpoints go to a folder beside output_dir every `save_steps`; a run killed midway
    resumes from its last one when called again with the same data and settings. Speed
    (tokens/s, MFU) is measured over the steps after `warmup_steps`.
    """
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    disable_progress_bar()
    require_checkpoint(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    native_tools = renders_tools(tokenizer)
    whole = tokenize_examples(tokenizer, training_examples(train_calls, native_tools))
    shared = (shared_instructions(list(train_calls["messages"]), list(train_calls["tools"]))
              if settings.factor_instructions else SharedInstructions())
    factored, carried = factor_out(train_calls, shared)
    factored = factored[carried]  # a call under other instructions is one the adapter will never answer
    tokenized = tokenize_examples(tokenizer, training_examples(factored, native_tools)) if shared else whole
    if shared:
        progress(f"trained without the instructions all calls share: {_mean_prompt_tokens(whole):.0f} -> "
                 f"{_mean_prompt_tokens(tokenized):.0f} prompt tokens per call; {len(carried) - sum(carried)} calls "
                 "under other instructions left out")
    cut, lost = calls_cut_by_max_length(tokenized, settings.max_length)
    if lost == len(tokenized):
        raise ValueError(f"max_length {settings.max_length} is shorter than every call's prompt: nothing would be "
                         "trained; raise max_length")
    if cut:
        progress(f"{cut} of {len(tokenized)} calls are longer than max_length {settings.max_length} tokens "
                 f"({lost} without any answer token left): their answers are cut; raise max_length to keep them")
    device = training_device()
    checkpoints = output_dir.parent / f".{output_dir.name}.checkpoints"
    fingerprint = fingerprint or training_fingerprint(str(base_dir), list(train_calls["trace_id"]), settings)
    resume = resumable_checkpoint(checkpoints, fingerprint)
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "fingerprint").write_text(fingerprint)
    if resume:
        progress(f"resuming from {resume.name}, left by a run that did not finish")
    model = _load_base_for_training(base_dir, settings, settings.attention)
    kernels = apply_kernels(model, settings)
    save_steps = settings.save_steps or max(10, settings.max_steps // 10)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(checkpoints, settings, save_strategy="steps", save_steps=save_steps, save_total_limit=1),
        train_dataset=Dataset.from_list(tokenized),  # tokenized already: TRL packs it as it is
        processing_class=tokenizer,
        peft_config=lora_config(settings),
        callbacks=list(callbacks),
    )
    # The meter reports progress; the default printer would dump every log dict to stdout.
    trainer.remove_callback(PrinterCallback)
    meter = TrainingMeter(settings.max_steps, progress, warmup_steps, on_checkpoint).attach(trainer)
    rows_per_step = settings.batch_size * settings.gradient_accumulation_steps
    # Saved among the checkpoints, so that they travel with them (object storage) and a resumed
    # run, on this machine or another, has the snapshots its killed run saved.
    snapshots = checkpoints / "snapshots"
    if not resume:
        shutil.rmtree(snapshots, ignore_errors=True)
    if snapshot_steps:
        trainer.add_callback(_snapshot_callback(set(snapshot_steps), snapshots))
    if settings.compile and device == "cuda":
        for layer in decoder_layers(trainer.model):
            layer.compile(dynamic=True)
    started = time.monotonic()
    with lm_head_on_answers(settings), out_of_memory_explained(settings, Path(base_dir).name):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    meter.mark(result.global_step)
    seconds = time.monotonic() - started
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training diverged: loss curve {[round(x, 4) for x in losses]}")

    metrics = {
        "device": device,
        "train_calls": int(len(train_calls)),
        "first_called_at": str(train_calls["called_at"].min())[:10],
        "last_called_at": str(train_calls["called_at"].max())[:10],
        "steps": int(result.global_step),
        "resumed_from_step": meter.first_step,
        "seconds": round(seconds, 1),
        "tokens": int(meter.tokens),
        **meter.summary(settings.lora_r),
        "kernels": kernels,
        "compiled": bool(settings.compile and device == "cuda"),
        "calls_cut_by_max_length": cut,
        # calls seen by each snapshot's step: whole calls are packed into rows, a step takes a fixed
        # number of rows (the same count whether or not the run was resumed in between)
        "snapshots": [{"step": step, "examples_seen": round(step * rows_per_step * len(tokenized) / len(trainer.train_dataset))}
                      for step in sorted(snapshot_steps) if (snapshots / f"step-{step}").is_dir()],
        "prompt_tokens_per_call": {"with_instructions": round(_mean_prompt_tokens(whole), 1),
                                   "trained_on": round(_mean_prompt_tokens(tokenized), 1)},
        "calls_under_other_instructions": len(carried) - sum(carried),
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(losses[-1], 4) if losses else None,
        "loss_curve": [round(x, 4) for x in losses],
        "fingerprint": fingerprint,
        "settings": asdict(settings),
    }
    # Written aside and renamed, so a killed run never leaves a half-written adapter in place.
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    answers = [baseline_answer(r) for r in train_calls["response_message"]] if settings.structured_decoding else []
    metrics["answer_format"] = write_answer_format(staging, answers, native_tools)["shape"]
    if shared:
        (staging / INSTRUCTIONS_FILE).write_text(json.dumps(shared.to_json(), indent=1, ensure_ascii=False) + "\n")
    (staging / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    if card is not None:
        write_model_card(staging, card, metrics)  # replaces PEFT's empty template
    replace_folder(staging, output_dir)
    shutil.rmtree(snapshot_folder(output_dir), ignore_errors=True)
    if snapshots.is_dir():
        snapshots.rename(snapshot_folder(output_dir))
    shutil.rmtree(checkpoints, ignore_errors=True)
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return metrics
