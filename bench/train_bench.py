"""Fine-tuning speed: plain TRL against the pipeline's training path, same data, same settings.

    python -m bench.train_bench prepare                      # curate the sample -> training calls
    python -m bench.train_bench run --base-dir DIR           # every variant, one after another
    python -m bench.train_bench run --base-dir DIR --variants trl,packed --quantization 4bit
    python -m bench.train_bench run --base-dir DIR --steps 12 --profile   # where the time goes
    python -m bench.train_bench check-attention     # packed attention vs per-call SDPA
    python -m bench.train_bench check-compile --base-dir DIR   # compiled layers vs eager, one batch

On the GPU machine of the `device` tool, set up by `bench/gpu_setup.sh` (its header says how).

`prepare` curates the bundled sample the way `curated_traces` does (PII scrubbed, duplicates
and low-signal calls out) and writes the trainable calls to `.gpu/bench/train_calls.parquet`,
so that a GPU machine without Presidio trains on exactly the data the pipeline would.

`run` trains one LoRA adapter per variant, each in a fresh process (so peak GPU memory is its
own), on the same calls with the same settings of quality: LoRA r=16 on all linear layers,
bf16, rows of `--max-length` tokens packed best-fit, `--batch-size` rows per step, the same
learning-rate schedule and seed, completion-only loss, `--steps` steps, loss logged every step.

- `trl`: plain TRL as a first implementation runs it (`SFTTrainer` defaults: SDPA attention, so
  a padding-free row of packed calls gets a dense block-diagonal mask; gradient checkpointing on).
- `packed`: the pipeline's `finetune.train_adapter` without fused kernels: variable-length flash
  attention inside each packed call, no activation recomputation.
- `packed+liger`: and Liger's fused RMSNorm, SwiGLU and RoPE kernels.
- `packed+compile`: `packed` with each decoder layer compiled by torch.compile (Inductor fuses
  the norms, activations and LoRA's elementwise work itself; Liger's kernels do not compile).
- `flex`, `flex+liger`: transformers' FlexAttention (a block mask built from the packed calls'
  position ids) in place of the variable-length kernel.
- `packed-trl-head`: `packed` with TRL's fused LM head left as TRL sets it: on a CPU it projects
  every position onto the vocabulary, prompts included (`finetune.lm_head_on_answers`); on
  CUDA it is `packed`.

On a CPU, the demo's settings: `run --base-dir DIR --variants packed-trl-head,packed --steps 12
--batch-size 2 --max-length 768 --learning-rate 5e-4`.

Reported per variant: tokens/s after the first `WARMUP_STEPS` steps, model TFLOP/s and MFU
(`finetune.lora_training_flops` over the datasheet bf16 peak), peak GPU memory, the per-step
loss curve, and its mean absolute difference from the first variant's curve. Results are appended
to bench/results/training.jsonl (or `--results-dir`) with the device, date and command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import results

REPO = Path(__file__).resolve().parents[1]
TRAIN_CALLS = REPO / ".gpu" / "bench" / "train_calls.parquet"
VARIANTS = ["trl", "packed", "packed+liger", "packed+compile"]
WARMUP_STEPS = 5


def prepare(out: Path) -> None:
    from pipeline import curate, ingest

    traces = ingest.read_calls(ingest.find_landing_files(REPO / "data" / "landing")).traces
    curated = curate.curate(traces).curated
    trainable = curated[curated["trainable"].astype(bool)]
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = ["trace_id", "called_at", "messages", "tools", "response_message"]
    trainable[columns].to_parquet(out)
    print(f"{len(trainable)} trainable calls of {len(traces)} -> {out}")


def check_attention() -> None:
    """`finetune.packed_attention` against per-call SDPA on random inputs, forward and backward."""
    import torch

    from pipeline import finetune

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    lengths = [37, 300, 1, 1024, 5, 211]
    heads, kv_heads, head_dim = 9, 3, 64
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    class Module:
        num_key_value_groups = heads // kv_heads
        is_causal = True

    def inputs():
        shape = lambda h: (1, h, sum(lengths), head_dim)  # noqa: E731
        return [torch.randn(shape(h), device=device, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads)]

    q, k, v = inputs()
    out, _ = finetune.packed_attention(Module(), q, k, v, None, scaling=head_dim**-0.5, cu_seq_lens_q=starts,
                                       max_length_q=max(lengths))
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_q, ref_k, ref_v = (t.detach().double().requires_grad_() for t in (q, k, v))
    parts = []
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            ref_q[:, :, a:b], ref_k[:, :, a:b].repeat_interleave(3, 1), ref_v[:, :, a:b].repeat_interleave(3, 1),
            is_causal=True).transpose(1, 2))
    ref = torch.cat(parts, dim=1)
    ref.backward(grad.double())
    error = lambda x, r: ((x.double() - r).norm() / r.norm()).item()  # noqa: E731
    report = {"device": device, "kernel": "varlen" if device == "cuda" and finetune._varlen_kernel() else "per-call SDPA",
              "out": error(out, ref), "dq": error(q.grad, ref_q.grad), "dk": error(k.grad, ref_k.grad),
              "dv": error(v.grad, ref_v.grad)}
    if not all(report[x] < 2e-2 for x in ("out", "dq", "dk", "dv")):
        raise SystemExit("packed attention disagrees with per-call SDPA")


def check_compile(args) -> None:
    """The compiled training path against the eager one on one real packed batch.

    1. Dropout off (eval mode), LoRA B made non-zero so every LoRA weight has a gradient: the loss
       and each LoRA gradient, eager against compiled, next to eager against eager again (the
       kernels' own run-to-run noise).
    2. Dropout on (train mode): the mean and spread of the loss over `DROPOUT_PASSES` forward
       passes, eager and compiled: a compiled layer must drop as often and scale as eager does.
    """
    import statistics

    import pandas as pd
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from pipeline import finetune

    if not torch.cuda.is_available():
        # train_adapter compiles only on CUDA (and CPU Inductor fails on these dynamic shapes)
        raise SystemExit("check-compile needs a CUDA GPU")
    settings = dataclasses.replace(settings_for("packed", args), batch_size=min(args.batch_size, 8))
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir)
    calls = pd.read_parquet(args.calls)
    tokenized = finetune.tokenize_examples(tokenizer, finetune.training_examples(calls))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SFTTrainer(
            model=finetune._load_base_for_training(args.base_dir, settings),
            args=finetune.sft_config(Path(scratch), settings),
            train_dataset=Dataset.from_list(tokenized),
            processing_class=tokenizer,
            peft_config=finetune.lora_config(settings),
        )
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    generator = torch.Generator().manual_seed(args.seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def loss_and_gradients(train: bool):
        model.train(train)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.item(), {name: p.grad.detach().float().clone() for name, p in lora.items()}

    def gradient_error(a: dict, b: dict) -> dict:
        errors = sorted(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)).item() for n in a)
        return {"median": round(errors[len(errors) // 2], 5), "max": round(errors[-1], 5)}

    def dropout_losses():
        losses = [loss_and_gradients(train=True)[0] for _ in range(DROPOUT_PASSES)]
        return {"mean": round(statistics.mean(losses), 5), "stdev": round(statistics.stdev(losses), 5)}

    eager_loss, eager_grads = loss_and_gradients(train=False)
    again_loss, again_grads = loss_and_gradients(train=False)
    eager_dropout = dropout_losses()
    for layer in finetune.decoder_layers(model):
        layer.compile(dynamic=True)
    compiled_loss, compiled_grads = loss_and_gradients(train=False)
    compiled_dropout = dropout_losses()
    report = {
        "device": torch.cuda.get_device_name(),
        "tokens": int(batch["input_ids"].numel()),
        "loss": {"eager": round(eager_loss, 5), "eager_again": round(again_loss, 5), "compiled": round(compiled_loss, 5)},
        "gradient_relative_error": {"eager_again_vs_eager": gradient_error(again_grads, eager_grads),
                                    "compiled_vs_eager": gradient_error(compiled_grads, eager_grads)},
        f"loss_with_dropout_{DROPOUT_PASSES}_passes": {"eager": eager_dropout, "compiled": compiled_dropout},
    }
    if args.results_dir:
        results.RESULTS = Path(args.results_dir)
    results.record("training", {"benchmark": "compile_check", **report})


DROPOUT_PASSES = 8


def settings_for(variant: str, args):
    from pipeline import finetune

    return finetune.TrainSettings(
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        quantization=args.quantization,
        seed=args.seed,
        kernels="liger" if "liger" in variant else "none",
        compile="compile" in variant,
        attention="flex_attention" if variant.startswith("flex") else finetune.PACKED_ATTENTION,
        lm_head="trl" if variant.endswith("trl-head") else finetune.ANSWERS_ONLY,
        logging_steps=1,
    )


PROFILED_STEPS = (8, 10)


def profile_callback(variant: str, out_dir: Path):
    """Profiles the steps PROFILED_STEPS (after warm-up) and writes where the time went: on a GPU
    the kernels by GPU time and how much of the wall time the GPU was busy; on a CPU the
    operators by their own CPU time."""
    import torch
    from transformers import TrainerCallback

    first, last = PROFILED_STEPS
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    class ProfileSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == first:
                sync()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != last:
                return
            sync()
            wall = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            steps = last - first + 1
            summary = f"{variant}: {steps} steps in {wall:.3f} s wall ({wall / steps * 1e3:.1f} ms/step)"
            if cuda:
                kernels = [e for e in self.profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                busy = sum(e.device_time for e in kernels) / 1e6
                summary += f"; GPU kernels {busy:.3f} s ({busy / wall:.0%} of wall), {len(kernels) / steps:.0f} kernels/step"
            sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
            table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=30)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"profile-{variant.replace('+', '-')}.txt").write_text(summary + "\n\n" + table)
            print(summary, file=sys.stderr, flush=True)

    return ProfileSteps()


def plain_trl(base_dir: Path, calls, settings, progress, callbacks=()) -> dict:
    """TRL as documented, with the benchmark's settings and TRL's own defaults for the rest."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    from pipeline import finetune

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SFTTrainer(
            model=finetune._load_base_for_training(base_dir, settings, attention="sdpa"),
            # TRL's default: activations recomputed in backward
            args=finetune.sft_config(Path(scratch), dataclasses.replace(settings, gradient_checkpointing=True)),
            train_dataset=Dataset.from_list(finetune.training_examples(calls)),
            processing_class=tokenizer,
            peft_config=finetune.lora_config(settings),
        )
        trainer.remove_callback(PrinterCallback)
        for callback in callbacks:
            trainer.add_callback(callback)
        meter = finetune.TrainingMeter(settings.max_steps, progress, WARMUP_STEPS).attach(trainer)
        started = time.monotonic()
        result = trainer.train()
        meter.mark(result.global_step)
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return {
            "steps": result.global_step,
            "seconds": round(time.monotonic() - started, 1),
            "tokens": meter.tokens,
            **meter.summary(settings.lora_r),
            "loss_curve": [round(x, 4) for x in losses],
        }


def one(args) -> None:
    """Train one variant in this process and print its result as the last line."""
    import pandas as pd
    import torch

    from pipeline import finetune

    calls = pd.read_parquet(args.calls)
    settings = settings_for(args.variant, args)
    progress = lambda message: print(f"  [{args.variant}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    callbacks = [profile_callback(args.variant, Path(args.results_dir or "."))] if args.profile else []
    if args.variant == "trl":
        measured = plain_trl(args.base_dir, calls, settings, progress, callbacks)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            measured = finetune.train_adapter(
                args.base_dir, calls, Path(scratch) / "adapter", settings, progress, warmup_steps=WARMUP_STEPS,
                callbacks=callbacks,
            )
        measured.pop("settings")
    import peft
    import transformers
    import trl

    measured["variant"] = args.variant
    measured["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "trl": trl.__version__}
    print(json.dumps(measured))


def run(args) -> None:
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, "-m", "bench.train_bench", "one", "--variant", variant,
                   *[a for k, v in vars(args).items() if k in SHARED and v is not None
                     for a in (f"--{k.replace('_', '-')}", str(v))],
                   *(["--profile"] if args.profile else [])]
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            rows.append({"variant": variant, "failed": f"exit {done.returncode}",
                         "seconds": round(time.monotonic() - started, 1)})
            print(f"{variant}: failed (exit {done.returncode}); see the log above", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{variant}: {row.get('tokens_per_second')} tokens/s, MFU {row.get('mfu')}, "
              f"{row.get('peak_memory_gib')} GiB, loss {row['loss_curve'][:1]}..{row['loss_curve'][-1:]}", flush=True)
    # Plain TRL is the reference where it ran: speedups and loss differences are against it.
    reference = next((r for r in rows if "loss_curve" in r and r["variant"] == "trl"), None)
    reference = reference or next((r for r in rows if "loss_curve" in r), None)
    for row in rows:
        if reference and "loss_curve" in row and row is not reference:
            pairs = list(zip(reference["loss_curve"], row["loss_curve"]))
            row["mean_abs_loss_difference"] = round(sum(abs(a - b) for a, b in pairs) / len(pairs), 4)
            if reference.get("tokens_per_second") and row.get("tokens_per_second"):
                row["speedup"] = round(row["tokens_per_second"] / reference["tokens_per_second"], 2)
    if args.results_dir:
        results.RESULTS = Path(args.results_dir)
    settings = {k: v for k, v in vars(args).items() if k in SHARED and k not in ("calls", "base_dir", "results_dir")}
    benchmark = "lora_training_profiled" if args.profile else "lora_training"
    results.record("training", {"benchmark": benchmark, "settings": settings, "variants": rows})
    print(f"\n{'variant':28} {'tokens/s':>10} {'speedup':>8} {'MFU':>7} {'peak GiB':>9} {'loss first→last':>16} {'|Δloss|':>8}")
    for r in rows:
        curve = r.get("loss_curve") or [None]
        print(f"{r['variant']:28} {r.get('tokens_per_second') or r.get('failed', ''):>10} "
              f"{r.get('speedup', ''):>8} {r.get('mfu') or '':>7} {r.get('peak_memory_gib', ''):>9} "
              f"{f'{curve[0]} → {curve[-1]}':>16} {r.get('mean_abs_loss_difference', ''):>8}")


SHARED = ["calls", "base_dir", "steps", "batch_size", "max_length", "learning_rate", "quantization", "seed",
          "results_dir"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "check-attention", "check-compile", "run", "one"])
    parser.add_argument("--calls", type=Path, default=TRAIN_CALLS)
    parser.add_argument("--base-dir", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--quantization", default="none", choices=["none", "4bit"])
    parser.add_argument("--seed", type=int, default=0, help="another seed gives the seed-to-seed noise of the loss curve")
    parser.add_argument("--results-dir", default=os.environ.get("BENCH_RESULTS_DIR"))
    parser.add_argument("--profile", action="store_true",
                        help=f"profile steps {PROFILED_STEPS[0]}-{PROFILED_STEPS[1]} into profile-<variant>.txt")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.calls)
    elif args.command == "check-attention":
        check_attention()
    elif args.base_dir is None:
        parser.error("--base-dir (a transformers checkpoint folder) is needed to train")
    elif args.command == "run":
        run(args)
    elif args.command == "check-compile":
        check_compile(args)
    else:
        one(args)


if __name__ == "__main__":
    main()
