"""Encoder specialists' learning curves and gate outcome, to choose their training defaults.

    python -m bench.encoder_bench --output output --epochs 24 --learning-rates 5e-5,1e-4 [--kinds span_tagger]
        [--positive-weights 1,4]

Reads a finished run's output folder (`slm-convert run`): for each cluster that got an encoder
specialist, the same training and held-out calls the run used. For each learning rate, a
specialist is trained for `--epochs` epochs, and after every epoch it answers all held-out
calls: the mean score against the logged answers on the calibration calls (the earlier half,
the learning curve the pipeline records) and, at the threshold calibrated on them as shadow
evaluation does (answers kept must clear the floor by their 95% lower bound), the test calls'
coverage, score and the 95% lower bound promotion compares with the floor; `mean_rule` gives the
same with the threshold calibrated as it was before (the kept answers' mean at the floor). The test calls are
read only to report; nothing is chosen on them here. Appended to bench/results/encoders.jsonl
with the machine, date and command.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import results
from pipeline import encoders, evaluate
from pipeline.promote import quality_lower_bound
from pipeline.store import Store, read_json, read_table


def gate_at(scored, floor: float, confidence: float, calibration_confidence: float | None) -> dict:
    """What shadow evaluation and promotion (its bound at `confidence`) would make of these scored
    held-out answers, the threshold calibrated with `calibration_confidence` (None: by the kept
    answers' mean)."""
    scored = scored.assign(split=evaluate.split_for_calibration(scored, 0.5))
    summary = evaluate.summarize_scores(scored, floor, calibration_confidence)
    answered, score = summary["answered_at_threshold"], summary["score_at_threshold"]
    return {"calibration_score": round(float(scored.loc[scored["split"] == evaluate.CALIBRATION, "score"].mean()), 4),
            "test_score": summary["score_vs_baseline"], "coverage": summary["coverage_at_threshold"],
            "answered": answered, "score_at_threshold": score,
            "bound": round(quality_lower_bound(score, answered, confidence), 4) if score is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("output"))
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--learning-rates", default="5e-5")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--positive-weights", default="1", help="classifier: weights of positive labels in the loss")
    parser.add_argument("--floor", type=float, default=0.8)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--kinds", default=",".join(encoders.ENCODER_KINDS), help="which specialists to train again")
    args = parser.parse_args()

    store = Store(Path(args.output))
    curated = read_table(store.table("curated_traces")).set_index("trace_id", drop=False)
    records = [read_json(p) for p in sorted(store.adapters.glob("*/encoder.json"))]
    records = [r for r in records if r.get("kind") in args.kinds.split(",")]
    if not records:
        raise SystemExit(f"no encoder specialist in {args.output}: run `slm-convert run` first")
    contracts = {c["cluster_id"]: c["contract"] for c in read_json(store.stats("slm_candidates"))["choices"]}
    for record in records:
        train = curated.loc[record["train_ids"]].reset_index(drop=True)
        holdout = curated.loc[record["holdout_ids"]].reset_index(drop=True)
        weights = [float(w) for w in args.positive_weights.split(",")] if record["kind"] == encoders.CLASSIFIER else [1.0]
        for rate, weight in [(float(r), w) for r in args.learning_rates.split(",") for w in weights]:
            curve = []
            settings = encoders.EncoderSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=rate,
                                                positive_weight=weight)
            started = time.perf_counter()
            requests = [encoders.request_text(m) for m in holdout["messages"]]

            def measure(epoch: int, answer) -> None:
                scored = evaluate.score_holdout(holdout, answer(requests))
                curve.append({"epoch": epoch, "seconds": round(time.perf_counter() - started, 1),
                              **gate_at(scored, args.floor, args.confidence, args.confidence),
                              # the threshold as calibrated before: the kept answers' mean at the floor
                              "mean_rule": gate_at(scored, args.floor, args.confidence, None)})
                print(record["label"], rate, curve[-1], flush=True)

            with tempfile.TemporaryDirectory() as folder:
                metrics = encoders.train_specialist(
                    record["kind"], contracts[record["cluster_id"]], encoders.encoder_path(), train,
                    Path(folder) / "specialist", settings, after_epoch=measure)
            results.record("encoders", {
                "cluster": record["cluster_id"], "label": record["label"], "kind": record["kind"],
                "train_calls": len(train), "examples": metrics["examples"], "holdout_calls": len(holdout),
                "settings": metrics["settings"], "floor": args.floor, "confidence": args.confidence,
                "seconds": metrics["seconds"], "curve": curve,
            })


if __name__ == "__main__":
    main()
