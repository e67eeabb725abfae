"""Step 5, fine-tuning: one LoRA adapter per chosen cluster, trained on its logged answers.

Shaped like TRL's `sft.py`: a prompt/completion dataset, `SFTConfig`, a PEFT `LoraConfig` and
`SFTTrainer`. The loss covers the completion (the logged answer) only. Each cluster's calls are
split by time first: the latest ones are held out for shadow evaluation and never trained on.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from pipeline.calls import baseline_answer, prompt_messages


@dataclass
class TrainSettings:
    """Training knobs. The defaults fit a short CPU run; raise max_steps on a GPU."""

    max_steps: int = 30
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 768
    seed: int = 0
    quantization: str = "none"  # "4bit" for QLoRA (CUDA only)


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


def training_examples(calls: pd.DataFrame) -> list[dict]:
    """Conversational prompt/completion pairs; TRL puts the loss on the completion only."""
    return [
        {
            "prompt": prompt_messages(m, t),
            "completion": [{"role": "assistant", "content": baseline_answer(r)}],
        }
        for m, t, r in zip(calls["messages"], calls["tools"], calls["response_message"])
    ]


def training_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_base_for_training(base_dir: Path, settings: TrainSettings):
    import torch
    from transformers import AutoModelForCausalLM

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
        return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, dtype=torch.bfloat16)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)


def _progress_callback(progress: Callable[[str], None], max_steps: int):
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = time.monotonic() - self.started
            eta = elapsed / max(state.global_step, 1) * (max_steps - state.global_step)
            tokens = logs.get("num_tokens")
            speed = f", {tokens / elapsed:,.0f} tokens/s" if tokens else ""
            progress(
                f"step {state.global_step}/{max_steps}, loss {logs['loss']:.3f}{speed}, ETA {eta:.0f}s"
            )

    return ReportProgress()


def train_adapter(
    base_dir: Path,
    train_calls: pd.DataFrame,
    output_dir: Path,
    settings: TrainSettings,
    progress: Callable[[str], None] = print,
) -> dict:
    """Train one LoRA adapter; returns training metrics. The adapter lands in output_dir."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list(training_examples(train_calls))
    device = training_device()
    checkpoints = output_dir.parent / f".{output_dir.name}.checkpoints"
    config = SFTConfig(
        output_dir=str(checkpoints),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.max_steps // 10),
        logging_steps=max(1, settings.max_steps // 10),
        max_length=settings.max_length,
        completion_only_loss=True,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        # A 135M-500M model's activations fit in memory many times over; recomputing them
        # (TRL's default) only costs time.
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=_load_base_for_training(base_dir, settings),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_progress_callback(progress, settings.max_steps)],
    )
    # Our callback reports progress; the default printer would dump every log dict to stdout.
    trainer.remove_callback(PrinterCallback)
    started = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - started
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    tokens = trainer.state.num_input_tokens_seen or next(
        (log["num_tokens"] for log in reversed(trainer.state.log_history) if "num_tokens" in log), 0
    )

    # Written aside and renamed, so a killed run never leaves a half-written adapter in place.
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    metrics = {
        "device": device,
        "train_calls": int(len(train_calls)),
        "steps": int(result.global_step),
        "seconds": round(seconds, 1),
        "tokens": int(tokens),
        "tokens_per_second": round(tokens / seconds, 1) if tokens else None,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(losses[-1], 4) if losses else None,
        "loss_curve": [round(x, 4) for x in losses],
        "settings": asdict(settings),
    }
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training diverged: loss curve {metrics['loss_curve']}")
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return metrics
