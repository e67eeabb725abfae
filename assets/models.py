"""Steps 4-5 as assets: slm_candidates -> finetuned_adapters."""

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field, field_validator, model_validator

from assets.data import curated_traces, task_clusters
from assets.metadata import check_result, markdown_table
from assets.resources import REPO_ROOT, PipelineStore
from pipeline import curate, encoders, evaluate, finetune, incontext, models, promote, select, structured
from pipeline.calls import INSTRUCTIONS_FILE, baseline_answer, read_instructions, renders_tools
from pipeline.cluster import cluster_key
from pipeline.store import read_json, read_table, replace_folder, write_json

GROUP = "models"


class SelectionConfig(dg.Config):
    candidates_file: str = str(REPO_ROOT / "configs" / "candidates.yaml")
    min_calls: int = Field(40, ge=1)  # fewer calls than this cannot train and judge an SLM
    max_mean_completion_tokens: int = Field(60, ge=1)  # longer reasoning or free text stays on the LLM
    probe: bool = True  # each qualifying candidate answers a few calls zero- and few-shot before the choice
    probe_calls: int = Field(select.ProbeSettings.calls, ge=1)  # calls of a cluster each candidate answers
    probe_shots: int = Field(select.ProbeSettings.shots, ge=0)  # solved calls in the few-shot prompt
    probe_margin: float = Field(select.ProbeSettings.margin, ge=0, le=1)  # a larger candidate must beat the smallest by more
    probe_max_new_tokens: int = Field(select.ProbeSettings.max_new_tokens_cap, ge=1)  # longest probe answer
    probe_structured_decoding: bool = True  # probe answers decoded in the shape of the cluster's answers
    # the kinds of specialist a cluster may get, cheapest first where its answers allow: "classifier"
    # (closed label sets), "span_tagger" (JSON of spans of the request), "generative" (LoRA on an SLM)
    specialist_kinds: list[str] = Field(default_factory=lambda: list(encoders.KINDS), min_length=1)
    # a step an encoder specialist can answer is measured with the enabled generator kinds too, and
    # the cheapest that passes serves (off: the encoder alone, the cheapest kind, is measured)
    measure_every_kind: bool = False

    @field_validator("specialist_kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(encoders.KINDS))
        if unknown:
            raise ValueError(f"unknown specialist kind(s) {', '.join(unknown)}; the kinds are {', '.join(encoders.KINDS)}")
        return kinds


@dg.asset(group_name=GROUP, deps=[curated_traces, task_clusters], kinds={"python"})
def slm_candidates(context: dg.AssetExecutionContext, config: SelectionConfig, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """Per cluster: the SLM to fine-tune (or "keep on LLM"), with the reason and the features of
    the cluster's work behind it. Unavailable candidates are listed with why."""
    store = pipeline_store.store()
    candidates = models.load_candidates(Path(config.candidates_file))
    # probe results of earlier runs: the same calls are not probed twice
    known_path = store.stats("probe_results")
    known_probes = read_json(known_path) if known_path.exists() else {}
    choices, unavailable = select.select_models(
        read_table(store.table("curated_traces")),
        read_table(store.table("task_clusters")),
        read_json(store.stats("task_clusters")),
        candidates,
        pipeline_store.model_cache(),
        min_calls=config.min_calls,
        max_mean_completion_tokens=config.max_mean_completion_tokens,
        probe_settings=select.ProbeSettings(
            calls=config.probe_calls, shots=config.probe_shots, margin=config.probe_margin,
            max_new_tokens_cap=config.probe_max_new_tokens, structured_decoding=config.probe_structured_decoding,
        ) if config.probe else None,
        progress=context.log.info,
        known_probes=known_probes,
        kinds=tuple(config.specialist_kinds),
        measure_every_kind=config.measure_every_kind,
    )
    write_json(known_path, known_probes)
    write_json(
        store.stats("slm_candidates"),
        {"choices": choices, "unavailable": unavailable, "candidates": [asdict(c) for c in candidates]},
    )
    for name, reason in unavailable.items():
        context.log.info(f"candidate {name} unavailable: {reason}")
    pipeline_store.publish(context.log.info)
    return dg.MaterializeResult(
        metadata={
            "clusters_to_fine_tune": sum(c["decision"] == select.FINE_TUNE for c in choices),
            "decisions": markdown_table(
                ["cluster", "label", "decision", "kind", "model", "reason"],
                [[c["cluster_id"], c["label"], c["decision"], c.get("kind") or "-", c["candidate"] or "-", c["reason"]]
                 for c in choices],
            ),
            "unavailable_candidates": dg.MetadataValue.json(unavailable),
            "probe_scores": dg.MetadataValue.json({c["cluster_id"]: c.get("probe") for c in choices}),
        }
    )


@dg.asset_check(asset=slm_candidates, description="Every chosen candidate is available on this machine.")
def chosen_candidates_available(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    selection = read_json(pipeline_store.store().stats("slm_candidates"))
    chosen = {name for c in selection["choices"] for name in (c["candidate"], c.get("generator")) if name}
    missing = sorted(chosen & set(selection["unavailable"]))
    return dg.AssetCheckResult(passed=not missing, metadata={"chosen": sorted(chosen), "missing": missing})


class FinetuneConfig(dg.Config):
    """LoRA settings; the defaults are a short CPU run (see configs/gpu.yaml for a GPU)."""

    max_steps: int = Field(6, ge=1)
    batch_size: int = Field(2, ge=1)  # rows of max_length tokens, each packed with whole calls
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(0.0, ge=0, lt=1)  # 0: by the base model's size (5e-4 up to 500M parameters, 2e-4 to 2B, 1e-4 above)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(768, ge=32)  # capped at the base model's context length
    quantization: Literal["none", "4bit"] = "none"  # "4bit": QLoRA with bitsandbytes (CUDA only)
    kernels: Literal["auto", "liger", "none"] = "auto"  # "liger": Liger's fused kernels (CUDA); "none"; auto: Liger where it runs
    compile: bool = False  # torch.compile each decoder layer (CUDA; the fastest on an H100)
    gradient_checkpointing: bool = False  # recompute activations in backward: for models or steps that do not fit in GPU memory
    save_steps: int = Field(0, ge=0)  # checkpoint interval, the point a killed run resumes from; 0: every tenth, >= 10
    merged_weights: bool = False  # also write the base model with the adapter merged in (servers without LoRA)
    # a generative adapter's answers are decoded only in the shape of its cluster's logged answers (closed
    # labels, JSON of the keys seen, calls of the request's own tools), by shadow evaluation and router alike
    structured_decoding: bool = True
    # train a generative adapter without the system prompt (and tool list) all its cluster's calls share:
    # it learns them, and a training step holds several times more calls; the router serves a call only
    # if it carries them verbatim (else "instructions changed", to the LLM)
    factor_instructions: bool = True
    # encoder specialists: whole passes over the cluster's training calls, per kind, from the learning
    # curves of the sample's intent and booking-field clusters (bench/README.md, "Encoder specialists"):
    # the classifier's test score rises to about 24 passes; the span tagger's flattens after 8-10
    classifier_epochs: int = Field(24, ge=1)
    span_tagger_epochs: int = Field(10, ge=1)
    encoder_batch_size: int = Field(16, ge=1)
    encoder_learning_rate: float = Field(5e-5, gt=0, lt=1)
    encoder_max_length: int = Field(128, ge=8)  # request tokens an encoder reads
    # a generative adapter's learning curve: its score on the earliest held-out calls (never the ones
    # shadow evaluation tests on, where the cluster has more than these) after evenly spaced steps
    generative_curve_points: int = Field(2, ge=0)  # 0: none
    generative_curve_calls: int = Field(6, ge=1)
    generative_curve_max_new_tokens: int = Field(160, ge=1)  # answer budget cap, shadow evaluation's default
    # the base SLM with retrieved examples (kind in_context): solved training calls shown per call; one
    # scored as two (0.101 vs 0.107) and four (0.101) on the sample's tool step, 23% faster than two
    # (bench/results/incontext.jsonl)
    in_context_shots: int = Field(incontext.DEFAULT_SHOTS, ge=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)  # latest share of each cluster's calls, kept for shadow eval
    min_holdout: int = Field(10, ge=1)
    max_holdout: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _holdout_bounds_in_order(self):
        if self.max_holdout < self.min_holdout:
            raise ValueError(f"max_holdout ({self.max_holdout}) is below min_holdout ({self.min_holdout})")
        return self

    def train_settings(self, candidate: models.Candidate) -> finetune.TrainSettings:
        return finetune.settings_for_model(self.model_dump(), candidate.params_millions, candidate.context_length)

    def encoder_settings(self, kind: str) -> encoders.EncoderSettings:
        epochs = self.classifier_epochs if kind == encoders.CLASSIFIER else self.span_tagger_epochs
        return encoders.EncoderSettings(epochs=epochs, batch_size=self.encoder_batch_size,
                                        learning_rate=self.encoder_learning_rate, max_length=self.encoder_max_length)

    def split_settings(self) -> finetune.SplitSettings:
        return finetune.SplitSettings(self.holdout_fraction, self.min_holdout, self.max_holdout)


@dg.asset(group_name=GROUP, deps=[slm_candidates], kinds={"pytorch"})
def finetuned_adapters(context: dg.AssetExecutionContext, config: FinetuneConfig, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """One LoRA adapter per cluster chosen for fine-tuning, trained with TRL on the cluster's
    earlier calls; the latest calls are held out for shadow evaluation."""
    store = pipeline_store.store()
    curated = read_table(store.table("curated_traces"))
    calls = curated.merge(read_table(store.table("task_clusters"))[["trace_id", "cluster_id"]], on="trace_id")
    selection = read_json(store.stats("slm_candidates"))
    candidates = {c.name: c for c in models.load_candidates_from_dicts(selection["candidates"])}

    trained = []
    for choice in selection["choices"]:
        if choice["decision"] != select.FINE_TUNE:
            continue
        key = cluster_key(choice["cluster_id"])
        members = calls[calls["cluster_id"] == choice["cluster_id"]]
        train, holdout = finetune.split_by_time(members, config.split_settings())
        kinds = choice.get("kinds_measured") or [choice.get("kind") or encoders.GENERATIVE]
        for kind in kinds:
            if kind in encoders.ENCODER_KINDS:
                try:
                    trained.append(_encoder_specialist(context, config, store, choice, train, holdout))
                except encoders.NothingToLearn as err:  # this kind is not measured; the others go on
                    context.log.warning(f"{key}: no {kind} trained: {err}")
                continue
            candidate = candidates[choice.get("generator") or choice["candidate"]]
            base_dir = models.resolve_model_dir(candidate, pipeline_store.model_cache())
            if kind == encoders.IN_CONTEXT:
                trained.append(_example_bank(context, config, store, choice, candidate.name, base_dir, train, holdout))
            else:
                trained.append(_lora_adapter(context, config, pipeline_store, choice, candidate, base_dir, train, holdout))
        _remove_other_kinds(store.adapters / key, kinds)

    write_json(store.stats("finetuned_adapters"), [{k: v for k, v in r.items() if not k.endswith("_ids")} for r in trained])
    pipeline_store.publish(context.log.info)
    return dg.MaterializeResult(
        metadata={
            "adapters": len(trained),
            "training": markdown_table(
                ["cluster", "kind", "model", "train calls", "prompt tokens per call (whole → trained on)",
                 "steps / epochs", "loss first → last", "tokens/s", "MFU", "peak GiB"],
                [
                    [r["cluster_id"], r.get("kind", encoders.GENERATIVE), r["candidate"], r["metrics"]["train_calls"],
                     _prompt_tokens(r["metrics"]), _passes(r["metrics"]),
                     f"{r['metrics'].get('first_loss', '–')} → {r['metrics'].get('final_loss', '–')}",
                     r["metrics"].get("tokens_per_second", "–"),
                     r["metrics"].get("mfu", "–"), r["metrics"].get("peak_memory_gib", "–")]
                    for r in trained
                ],
            ),
        }
    )


# what each kind of specialist keeps in its cluster's folder under adapters/: its model's folder,
# its record, and anything else it writes there
KIND_FILES = {encoders.CLASSIFIER: ("specialist", "encoder.json"), encoders.SPAN_TAGGER: ("specialist", "encoder.json"),
              encoders.GENERATIVE: ("adapter", "training.json", "merged"), encoders.IN_CONTEXT: ("examples", "in_context.json")}


def _kind_paths(store, key: str, kind: str) -> tuple[Path, Path]:
    """(model folder, training record) of one kind of specialist of the cluster `key`."""
    folder, record, *_ = KIND_FILES[kind]
    return store.adapters / key / folder, store.adapters / key / record


def _lora_adapter(context: dg.AssetExecutionContext, config: FinetuneConfig, pipeline_store: PipelineStore,
                  choice: dict, candidate: models.Candidate, base_dir: Path, train, holdout) -> dict:
    """Train (or keep, when its data and settings are unchanged) one cluster's LoRA adapter, and
    merge it into the base weights where asked; its training record."""
    store = pipeline_store.store()
    key = cluster_key(choice["cluster_id"])
    settings = config.train_settings(candidate)
    fingerprint = finetune.training_fingerprint(candidate.name, list(train["trace_id"]), settings)
    adapter_dir, record_path = _kind_paths(store, key, encoders.GENERATIVE)
    merged_dir = store.adapters / key / "merged"
    kept = read_json(record_path) if record_path.exists() and adapter_dir.exists() else None
    if kept and kept.get("fingerprint") == fingerprint:
        context.log.info(f"{key}: data and settings unchanged, keeping its adapter")
        record = kept
    else:
        context.log.info(f"{key}: training {candidate.name} on {len(train)} calls, {len(holdout)} held out")
        card = finetune.ModelCard(
            base_model=candidate.name, licence=candidate.licence,
            task=choice["label"], cluster_id=int(choice["cluster_id"]),
        )
        metrics = finetune.train_adapter(
            base_dir, train, adapter_dir, settings, progress=lambda m, k=key: context.log.info(f"{k}: {m}"),
            card=card, fingerprint=fingerprint,
            # on object storage each checkpoint is uploaded as saved: a step that loses its
            # machine (a preempted GPU node) resumes from it on the next one
            on_checkpoint=lambda folder: pipeline_store.publish_folder(folder, context.log.info),
            snapshot_steps=_curve_steps(settings.max_steps, config.generative_curve_points),
        )
        metrics["learning_curve"] = _generative_curve(context, config, key, base_dir, adapter_dir, metrics,
                                                      train, holdout)
        shutil.rmtree(merged_dir, ignore_errors=True)  # merged from the previous adapter
        record = {
            "cluster_id": choice["cluster_id"],
            "label": choice["label"],
            "kind": encoders.GENERATIVE,
            "candidate": candidate.name,
            "base_dir": str(base_dir),
            "adapter_dir": str(adapter_dir),
            "fingerprint": fingerprint,
            "train_ids": list(train["trace_id"]),
            "holdout_ids": list(holdout["trace_id"]),
            "metrics": metrics,
        }
    if config.merged_weights and not (merged_dir / "config.json").is_file():
        context.log.info(f"{key}: merging the adapter into {candidate.name}'s weights")
        finetune.merge_adapter(base_dir, adapter_dir, merged_dir)
    elif not config.merged_weights:
        shutil.rmtree(merged_dir, ignore_errors=True)
    record = {**record, "merged_dir": str(merged_dir) if config.merged_weights else None, "record_file": record_path.name}
    if record != kept:  # a kept adapter's record stays untouched
        write_json(record_path, record)
    return record


def _curve_steps(max_steps: int, points: int) -> tuple[int, ...]:
    """`points` evenly spaced steps of a training run, its last one included."""
    return tuple(sorted({max(1, round(max_steps * i / points)) for i in range(1, points + 1)})) if points else ()


def _generative_curve(context: dg.AssetExecutionContext, config: FinetuneConfig, key: str, base_dir: Path,
                      adapter_dir: Path, metrics: dict, train, holdout) -> list[dict]:
    """The adapter's learning curve from the snapshots its training saved (then removed)."""
    snapshots = finetune.snapshot_folder(adapter_dir)
    try:
        calls = holdout.iloc[: config.generative_curve_calls]
        context.log.info(f"{key}: learning curve: {len(metrics['snapshots'])} snapshots answering {len(calls)} held-out calls")
        curve = evaluate.snapshot_learning_curve(
            base_dir, snapshots, metrics["snapshots"], calls, [baseline_answer(r) for r in train["response_message"]],
            evaluate.GenerationSettings(batch_size=config.generative_curve_calls,
                                        max_new_tokens_cap=config.generative_curve_max_new_tokens),
            structured.read_answer_format(adapter_dir), read_instructions(adapter_dir))
    finally:
        shutil.rmtree(snapshots, ignore_errors=True)
    context.log.info(f"{key}: learning curve " + ", ".join(f"{p['examples_seen']} calls: {p['score']}" for p in curve))
    return curve


def _remove_other_kinds(folder: Path, kinds: list[str]) -> None:
    """Remove what kinds of specialist an earlier run built for this cluster and this one did not."""
    kept = {name for kind in kinds for name in KIND_FILES[kind]}
    for name in {name for names in KIND_FILES.values() for name in names} - kept:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink()


def _passes(metrics: dict) -> str:
    if "shots" in metrics:
        return f"none ({metrics['shots']} retrieved examples a call)"
    return str(metrics.get("steps") or f"{metrics.get('epochs')} epochs")


def _example_bank(context: dg.AssetExecutionContext, config: FinetuneConfig, store, choice: dict, base_model: str,
                  base_dir: Path, train, holdout) -> dict:
    """Write (or keep, when its calls and settings are unchanged) one cluster's example bank: the
    base SLM with retrieved examples, a candidate that needs no training; its record."""
    key = cluster_key(choice["cluster_id"])
    folder, record_path = _kind_paths(store, key, encoders.IN_CONTEXT)
    fingerprint = incontext.bank_fingerprint(base_model, list(train["trace_id"]), config.in_context_shots)
    kept = read_json(record_path) if record_path.exists() and folder.exists() else None
    if kept and kept.get("fingerprint") == fingerprint:
        context.log.info(f"{key}: calls unchanged, keeping its example bank")
        return kept
    from transformers import AutoTokenizer

    staging = folder.with_name(f".{folder.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    native_tools = renders_tools(AutoTokenizer.from_pretrained(base_dir))
    found = incontext.write_bank(staging, train, [baseline_answer(r) for r in train["response_message"]], native_tools,
                                 config.in_context_shots, base_model, choice["label"])
    replace_folder(staging, folder)
    context.log.info(f"{key}: example bank of {len(train)} solved calls for {base_model} with "
                     f"{config.in_context_shots} retrieved examples a call")
    record = {"cluster_id": choice["cluster_id"], "label": choice["label"], "kind": encoders.IN_CONTEXT,
              "candidate": base_model, "base_dir": str(base_dir), "adapter_dir": str(folder),
              "fingerprint": fingerprint, "train_ids": list(train["trace_id"]), "holdout_ids": list(holdout["trace_id"]),
              "metrics": {"train_calls": len(train), "shots": config.in_context_shots, "answer_format": found["shape"]},
              "merged_dir": None, "record_file": record_path.name}
    write_json(record_path, record)
    return record


def _prompt_tokens(metrics: dict) -> str:
    tokens = metrics.get("prompt_tokens_per_call")
    return f"{tokens['with_instructions']} → {tokens['trained_on']}" if tokens else "–"


def _encoder_specialist(context: dg.AssetExecutionContext, config: FinetuneConfig, store, choice: dict,
                        train, holdout) -> dict:
    """Train (or keep, when its data and settings are unchanged) one cluster's encoder specialist;
    its training record. The learning curve is read on the earlier half of the held-out calls,
    where shadow evaluation calibrates (by default); the later, test half is never looked at."""
    key = cluster_key(choice["cluster_id"])
    folder, record_path = _kind_paths(store, key, choice["kind"])
    settings = config.encoder_settings(choice["kind"])
    fingerprint = encoders.training_fingerprint(choice["kind"], choice["contract"], list(train["trace_id"]), settings)
    kept = read_json(record_path) if record_path.exists() and folder.exists() else None
    if kept and kept.get("fingerprint") == fingerprint:
        context.log.info(f"{key}: data and settings unchanged, keeping its {choice['kind']}")
        return kept
    context.log.info(f"{key}: training a {choice['kind']} ({choice['candidate']}) on {len(train)} calls, "
                     f"{len(holdout)} held out")
    metrics = encoders.train_specialist(
        choice["kind"], choice["contract"], encoders.encoder_path(), train, folder, settings,
        curve_calls=holdout.iloc[: len(holdout) // 2],
        instructions=[encoders.instructions_key(m, t) for m, t in zip(train["messages"], train["tools"])],
        progress=lambda m: context.log.info(f"{key}: {m}"),
    )
    record = {"cluster_id": choice["cluster_id"], "label": choice["label"], "kind": choice["kind"],
              "candidate": choice["candidate"], "base_dir": encoders.encoder_path(), "adapter_dir": str(folder),
              "fingerprint": fingerprint, "train_ids": list(train["trace_id"]),
              "holdout_ids": list(holdout["trace_id"]), "metrics": metrics, "merged_dir": None,
              "record_file": record_path.name}
    write_json(record_path, record)
    return record


@dg.asset_check(asset=finetuned_adapters, description="Every adapter folder holds a loadable PEFT adapter, and every "
                                                      "encoder specialist's folder a model the router can serve.")
def adapters_are_complete(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    records = read_json(pipeline_store.store().stats("finetuned_adapters"))
    incomplete = [r["adapter_dir"] for r in records
                  if promote.missing_files(r.get("kind", encoders.GENERATIVE), Path(r["adapter_dir"]))]
    return dg.AssetCheckResult(passed=not incomplete, metadata={"adapters": len(records), "incomplete": incomplete})


@dg.asset_check(
    asset=finetuned_adapters,
    blocking=True,
    description="No e-mail, card number, US phone number, API key, token, private key or password pattern in the text that ships with an adapter (model card, metrics, configs, chat template), nor in the calls and answers of an example bank.",
)
def no_known_pii_in_adapters(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    records = read_json(pipeline_store.store().stats("finetuned_adapters"))
    # the vocabulary files come unchanged from the base model and are left out
    written = ("README.md", "training_metrics.json", "adapter_config.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json", structured.ANSWER_FORMAT_FILE, INSTRUCTIONS_FILE)
    files = [Path(r["adapter_dir"]) / name for r in records for name in written
             if (Path(r["adapter_dir"]) / name).is_file()]
    leaks = {str(f): found for f in files if (found := curate.leaks_in(f.read_text(errors="replace")))}
    # an example bank holds curated calls: the texts curation scrubbed, checked as the curated calls are
    banks = [Path(r["adapter_dir"]) for r in records if r.get("kind") == encoders.IN_CONTEXT]
    leaks |= {str(b / incontext.EXAMPLES_FILE): [name for name, n in found.items() if n] for b in banks
              if sum((found := curate.find_leaks(incontext.scrubbed_texts(b))).values())}
    return check_result(
        leaks,
        what="files shipped with a specialist that match a personal-data or secret pattern",
        next_step="they are written from curated calls, cluster labels and settings, which the leak sweep has passed, so "
                  "look in the named file for the kind named; delete that specialist's folder and materialize "
                  "finetuned_adapters again (`slm-convert run` does); if it is written again, report the file and kind.",
        files_scanned=len(files) + len(banks),
    )
