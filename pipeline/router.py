"""The router's decisions, apart from HTTP (`pipeline.router_service` serves them).

For each chat-completion request:

    RouteTable.match      the call's task-signature embedding, computed as clustering computed it,
                          against each promoted route's centroid; the nearest route whose match
                          rule admits the call, or none
    SlmEngine.answer      the route's base SLM with the route's LoRA adapter answers greedily
                          (an in_context route: the base SLM alone, shown the solved calls of
                          its example bank most like the call, `pipeline.incontext`);
                          one base model in memory, adapters switched per request; the answer's
                          confidence is the geometric mean of its token probabilities, as in
                          shadow evaluation, so the route's calibrated threshold means the same.
                          An encoder specialist's route (classifier, span tagger) is answered by
                          its model in-process, only for calls under the instructions it was
                          trained with (else: "instructions changed", to the fallback)
    TraceWriter.write     every answered call, in the canonical trace format, into the landing
                          folder, so the next nightly run learns from it

The router serves the SLM's answer only when its confidence meets the route's threshold;
otherwise, and for calls no route admits, the service forwards the request to the fallback LLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import cluster, encoders, incontext, promote, rawzone, structured
from pipeline.calls import (
    ROUTER_SLM_MODEL_PREFIX, TOOL_CALL_OPEN, SharedInstructions, chat_of_call, parse_tool_calls, read_instructions,
    render_prompt, renders_tools, signature_parts, system_prompt_key, without_instructions,
)
from pipeline.formats import json_text


@dataclass(frozen=True)
class Route:
    """One promoted route of router.yaml, ready to match calls and answer them."""

    name: str
    version: str
    label: str
    centroid: np.ndarray  # unit length
    min_similarity: float
    embedding_model: str
    signature: str
    base_model_path: str
    adapter_dir: Path
    threshold: float
    max_new_tokens: int
    kind: str = encoders.GENERATIVE
    instructions: frozenset[str] = frozenset()  # encoder specialists: the instructions_key values it serves
    shared: SharedInstructions = SharedInstructions()  # generative: the instructions its adapter was trained without
    system_prompts: frozenset[str] = frozenset()  # keys of the system prompts only this route's cluster carried
    # the instruction segments its signature keeps, where steps share a preamble (cluster.step_instruction_segments)
    step_segments: frozenset[str] | None = None

    @property
    def key(self) -> str:
        """The route's version, as the router names it in headers, logs and adapters."""
        return f"{self.name}@{self.version}"

    def serves_instructions_of(self, messages_json: str, tools_json: str | None) -> bool:
        """Whether a call carries the instructions the route's model was trained under (else it
        goes to the LLM as "instructions changed"): an encoder specialist knows each system
        prompt and tool list it saw; an adapter trained without its cluster's shared ones needs
        the call to carry them verbatim."""
        if self.instructions:
            return encoders.instructions_key(messages_json, tools_json) in self.instructions
        return not self.shared or without_instructions(messages_json, tools_json, self.shared) is not None


@dataclass(frozen=True)
class Match:
    route: Route | None  # None: no route admits the call
    similarity: float  # to the nearest route's centroid (-1 when there are no routes; 1 by system prompt)
    nearest: str | None  # the nearest route's name, admitted or not
    by_system_prompt: bool = False  # found by the call's system prompt, without an embedding


class EmbeddingCache:
    """Text embeddings with the texts seen last kept in memory: an agent sends the same system
    prompt and tool list with every call, so most of a call's signature is embedded once."""

    def __init__(self, max_texts: int = 4096):
        self._vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._max_texts = max_texts
        self._lock = threading.Lock()
        # one encode at a time: a fast tokenizer used by two threads at once raises "Already borrowed"
        self._encoding = threading.Lock()

    def embed(self, texts: list[str], model_name: str) -> np.ndarray:
        with self._lock:
            found = {t: self._vectors[(model_name, t)] for t in set(texts) if (model_name, t) in self._vectors}
            for text in found:
                self._vectors.move_to_end((model_name, text))
        missing = sorted(set(texts) - set(found))
        if missing:
            with self._encoding:
                vectors = cluster.embed_texts(missing, model_name)
            found.update(zip(missing, vectors))
            with self._lock:
                for text, vector in zip(missing, vectors):
                    self._vectors[(model_name, text)] = vector
                while len(self._vectors) > self._max_texts:
                    self._vectors.popitem(last=False)
        return np.stack([found[t] for t in texts])


class RouterConfigError(ValueError):
    """router.yaml or a route's registry version cannot be served; the message says which."""


@dataclass(frozen=True)
class RouteTable:
    """What router.yaml says to serve, read once per version of the file."""

    version: int
    routes: tuple[Route, ...]
    fallback: dict

    @classmethod
    def load(cls, registry: Path) -> RouteTable:
        path = registry / promote.ROUTER_CONFIG
        if not path.exists():
            raise RouterConfigError(f"{path} does not exist: run `slm-convert run` to promote routes first "
                                    "(with no promoted route every call goes to the fallback)")
        try:
            config = promote.read_router_config(registry)
            routes = tuple(_route(registry, entry) for entry in config.get("routes") or [])
            fallback = config["fallback"]
            return cls(int(config["version"]), routes, dict(fallback))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise RouterConfigError(f"{path} is not a valid router config ({type(err).__name__}: {err}); "
                                    "see ROUTER_SCHEMA in pipeline/promote.py") from err

    @cached_property
    def by_system_prompt(self) -> dict[str, Route]:
        """System-prompt key -> the one route that claims it (a key two routes claim is left to
        the embedding match)."""
        owners: dict[str, list[Route]] = {}
        for route in self.routes:
            for key in route.system_prompts:
                owners.setdefault(key, []).append(route)
        return {key: claimed[0] for key, claimed in owners.items() if len(claimed) == 1}

    def match(self, messages_json: str, tools_json: str | None, embeddings: EmbeddingCache) -> Match:
        """The route whose cluster alone carried the call's system prompt (a lookup, microseconds);
        else the nearest route whose match rule admits the call (cosine similarity of the call's
        task signature to the route's centroid at least its min_similarity; one embedding)."""
        if not self.routes:
            return Match(None, -1.0, None)
        owner = self.by_system_prompt.get(system_prompt_key(messages_json))
        if owner is not None:
            return Match(owner, 1.0, owner.name, by_system_prompt=True)
        best: tuple[float, Route] | None = None
        for (model_name, signature, step_segments), routes in _by_embedding(self.routes).items():
            parts = signature_parts(messages_json, tools_json, step_segments=step_segments)
            vector = cluster.signature_vectors([parts], model_name, signature, embed=embeddings.embed)[0]
            for route in routes:
                similarity = float(vector @ route.centroid)
                if best is None or similarity > best[0]:
                    best = (similarity, route)
        similarity, nearest = best
        admitted = nearest if similarity >= nearest.min_similarity else None
        return Match(admitted, similarity, nearest.name)


def _by_embedding(routes: tuple[Route, ...]) -> dict[tuple[str, str, frozenset[str] | None], list[Route]]:
    groups: dict[tuple[str, str, frozenset[str] | None], list[Route]] = {}
    for route in routes:
        groups.setdefault((route.embedding_model, route.signature, route.step_segments), []).append(route)
    return groups


def _route(registry: Path, entry: dict) -> Route:
    match = entry["match"]
    centroid = np.asarray(match["centroid"], dtype=np.float32)
    if problems := promote.version_problems(registry, entry["adapter"]):
        raise RouterConfigError(f"route {entry['name']} {entry['version']}: {'; '.join(problems)}")
    adapter_dir = registry / entry["adapter"]
    kind = entry.get("kind", encoders.GENERATIVE)
    instructions: frozenset[str] = frozenset()
    shared = SharedInstructions()
    if kind in encoders.ENCODER_KINDS:
        if problems := encoders.servability_problems(adapter_dir):
            raise RouterConfigError(f"route {entry['name']} {entry['version']}: {'; '.join(problems)}")
        instructions = frozenset(json.loads((adapter_dir / encoders.SPECIALIST_FILE).read_text())["instructions"])
    elif kind == encoders.IN_CONTEXT:
        if problems := incontext.servability_problems(adapter_dir, entry["base_model_path"]):
            raise RouterConfigError(f"route {entry['name']} {entry['version']}: {'; '.join(problems)}")
    elif kind != encoders.GENERATIVE:
        raise RouterConfigError(f"route {entry['name']}: unknown kind {kind!r} (one of {', '.join(encoders.KINDS)})")
    elif missing := promote.missing_files(kind, adapter_dir):
        raise RouterConfigError(f"route {entry['name']} {entry['version']}: no adapter in {adapter_dir} "
                                f"({', '.join(missing)} missing)")
    else:
        shared = read_instructions(adapter_dir)
    signature = match.get("signature", promote.DEFAULT_MATCH_EMBEDDING["signature"])
    if signature not in cluster.SIGNATURES:
        raise RouterConfigError(f"route {entry['name']}: unknown signature {signature!r}")
    return Route(
        name=entry["name"],
        version=entry["version"],
        label=entry.get("label", ""),
        centroid=centroid / (np.linalg.norm(centroid) or 1.0),
        min_similarity=float(match["min_similarity"]),
        embedding_model=match.get("embedding_model", promote.DEFAULT_MATCH_EMBEDDING["model"]),
        signature=signature,
        base_model_path=entry["base_model_path"],
        adapter_dir=adapter_dir,
        threshold=float(entry["confidence_threshold"]),
        max_new_tokens=int(entry.get("max_new_tokens", promote.DEFAULT_MAX_NEW_TOKENS)),
        kind=kind,
        instructions=instructions,
        shared=shared,
        system_prompts=frozenset(match.get("system_prompts") or []),
        step_segments=frozenset(match["step_segments"]) if match.get("step_segments") is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# The SLM


class SlmTimeout(RuntimeError):
    """The SLM did not answer within the time a request may wait for it."""


@dataclass(frozen=True)
class SlmAnswer:
    message: dict | None  # the OpenAI assistant message; None when the answer could not be read
    text: str  # what the model wrote
    confidence: float
    finish_reason: str  # stop, tool_calls, length
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from the request's arrival at the SLM to its answer, waiting included


@dataclass
class _Pending:
    """One request waiting for the SLM."""

    route: Route
    chat: object
    budget: int
    deadline: float  # time.monotonic() after which the request has fallen back
    future: Future
    grammar: object = None  # the answer's compiled grammar (`pipeline.structured`); None: free


class SlmEngine:
    """The promoted routes' models: one base model per base-model path, every route's adapter
    loaded beside it under the route's key and switched per batch.

    Requests are answered by one worker thread in batches: whatever requests of one route are
    waiting when the model is free (up to `max_batch`) are answered by one batched `generate`
    (`evaluate.generate_answers`: same answers as one at a time; the route's shared system prompt
    encoded once). On a CPU one decode step of a batch costs little more than one of a single
    call, since reading the weights dominates, so concurrent requests of a route cost about what
    one does. A request that waits longer than its timeout gets SlmTimeout and falls back.
    """

    def __init__(self, max_batch: int = 16):
        self.max_batch = max_batch
        self._models: dict[str, tuple[object, object]] = {}  # base model path -> (PeftModel, tokenizer)
        self._adapters: dict[str, str] = {}  # route key -> base model path
        self._banks: dict[str, incontext.ExampleBank] = {}  # in-context route key -> its solved calls
        self._specialists: dict[str, encoders.Specialist] = {}  # route key -> encoder specialist
        self._formats: dict[str, dict] = {}  # route key -> the answer format its adapter was trained for
        self._grammars: dict[str, structured.AnswerGrammars] = {}  # base model path -> its compiled grammars
        self._specialist_lock = threading.Lock()  # one encoder forward at a time (a fast tokenizer is not thread-safe)
        self._lock = threading.Lock()  # held while the models change or generate
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self.batch_sizes: list[int] = []  # of every batch answered (for tests and benchmarks)
        threading.Thread(target=self._serve, name="slm-engine", daemon=True).start()

    @property
    def loaded(self) -> set[str]:
        return set(self._adapters) | set(self._specialists) | set(self._banks)

    def prepare(self, routes: tuple[Route, ...]) -> None:
        """Load the adapters of `routes` not loaded yet (and their base models), and the encoder
        specialists."""
        from pipeline.evaluate import load_adapter_model

        for route in routes:
            if route.key in self.loaded:
                continue
            if route.kind in encoders.ENCODER_KINDS:
                specialist = encoders.Specialist(route.adapter_dir)
                with self._specialist_lock:
                    self._specialists[route.key] = specialist
                continue
            with self._lock:
                if route.kind == encoders.IN_CONTEXT:  # the base model as it is, whatever adapters it carries
                    if route.base_model_path not in self._models:
                        self._models[route.base_model_path] = load_adapter_model(Path(route.base_model_path), None)
                    self._banks[route.key] = incontext.ExampleBank.load(route.adapter_dir)
                elif route.base_model_path not in self._models:
                    self._models[route.base_model_path] = load_adapter_model(
                        Path(route.base_model_path), route.adapter_dir, adapter_name=route.key)
                else:
                    self._models[route.base_model_path] = _with_adapter(self._models[route.base_model_path], route)
                if route.kind != encoders.IN_CONTEXT:
                    self._adapters[route.key] = route.base_model_path
                self._formats[route.key] = structured.read_answer_format(route.adapter_dir)
                if self._formats[route.key]["shape"] != structured.FREE and route.base_model_path not in self._grammars:
                    model, tokenizer = self._models[route.base_model_path]
                    self._grammars[route.base_model_path] = structured.AnswerGrammars(tokenizer, model.config.vocab_size)

    def retire(self, keep: set[str]) -> None:
        """Unload adapters of versions no longer served (keeping at least one per base model,
        which PEFT needs to stay a PEFT model)."""
        with self._specialist_lock:
            for key in sorted(set(self._specialists) - keep):
                del self._specialists[key]
        with self._lock:
            for key in sorted(set(self._banks) - keep):
                del self._banks[key]
                self._formats.pop(key, None)
            for key in sorted(set(self._adapters) - keep):
                model, _ = self._models[self._adapters[key]]
                others = [k for k, base in self._adapters.items() if base == self._adapters[key] and k != key]
                if not others:
                    continue
                if model.active_adapter == key:
                    model.set_adapter(others[0])
                model.delete_adapter(key)
                del self._adapters[key]
                self._formats.pop(key, None)

    def answer(self, route: Route, messages_json: str, tools_json: str | None, max_new_tokens: int | None,
               timeout: float) -> SlmAnswer:
        """The route's SLM answer to one call, or SlmTimeout when it cannot give it in `timeout`
        seconds (waiting for the model included)."""
        if route.kind in encoders.ENCODER_KINDS:
            return self._specialist_answer(route, messages_json)
        if route.key not in self._adapters and route.key not in self._banks:
            raise RuntimeError(f"adapter of {route.key} is not loaded")
        _, tokenizer = self._models[route.base_model_path]
        grammar_tools = tools_json  # a tool call may name the request's own tools, factored out or not
        if route.shared:
            factored = without_instructions(messages_json, tools_json, route.shared)
            if factored is None:
                raise ValueError(f"the call does not carry the instructions {route.key} was trained without")
            messages_json, tools_json = factored
        if route.kind == encoders.IN_CONTEXT:  # the call with the bank's solved calls most like it
            chat = self._banks[route.key].prompts([messages_json], [tools_json], renders_tools(tokenizer))[0]
        else:
            chat = chat_of_call(messages_json, tools_json, renders_tools(tokenizer))
        budget = min(route.max_new_tokens, max_new_tokens or route.max_new_tokens)
        found = self._formats.get(route.key, {"shape": structured.FREE})
        grammar = (self._grammars[route.base_model_path].for_call(found, grammar_tools)
                   if found["shape"] != structured.FREE else None)
        pending = _Pending(route, chat, budget, time.monotonic() + timeout, Future(), grammar)
        queued = time.perf_counter()
        self._queue.put(pending)
        try:
            answer = pending.future.result(timeout=timeout)
            return dataclasses.replace(answer, seconds=time.perf_counter() - queued)
        except FutureTimeout:
            pending.future.cancel()  # the worker skips it if it has not started on it
            raise SlmTimeout(f"no answer from the SLM within {timeout:.1f}s") from None

    def _specialist_answer(self, route: Route, messages_json: str) -> SlmAnswer:
        """An encoder specialist's answer: one forward pass, milliseconds on a CPU; its text is
        the logged answers' format (a label list, a JSON object), its message plain content."""
        started = time.perf_counter()
        request = encoders.request_text(messages_json)
        with self._specialist_lock:
            specialist = self._specialists.get(route.key)
            if specialist is None:
                raise RuntimeError(f"encoder specialist of {route.key} is not loaded")
            (text, confidence), = specialist.answer([request])
            prompt_tokens = len(specialist.tokenizer(request, truncation=True, max_length=specialist.spec["max_length"])["input_ids"])
        return SlmAnswer({"role": "assistant", "content": text}, text, confidence, "stop", prompt_tokens, 0,
                         time.perf_counter() - started)

    def _serve(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            first = batch[0].route.key
            for pending in batch[1:]:
                if pending.route.key != first:  # another route's request waits for the next batch
                    self._queue.put(pending)
            self._answer_batch([p for p in batch if p.route.key == first])

    def _answer_batch(self, batch: list[_Pending]) -> None:
        from pipeline.evaluate import base_model_only, generate_answers

        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not batch:
            return
        now = time.monotonic()
        route = batch[0].route
        try:
            with self._lock:
                model, tokenizer = self._models[route.base_model_path]
                left = max(max(p.deadline for p in batch) - now, 0.001)  # a request past its own deadline has fallen back
                if route.kind != encoders.IN_CONTEXT:
                    model.set_adapter(route.key)
                with base_model_only(model) if route.kind == encoders.IN_CONTEXT else contextlib.nullcontext():
                    answers = generate_answers(model, tokenizer, [p.chat for p in batch], max(p.budget for p in batch),
                                               batch_size=len(batch), max_time=left, grammars=[p.grammar for p in batch])
                # counted here too: a fast tokenizer must not be used by two threads at once
                prompt_tokens = [len(tokenizer(render_prompt(tokenizer, p.chat), add_special_tokens=False)["input_ids"])
                                 for p in batch]
                completion_tokens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text, _ in answers]
            self.batch_sizes.append(len(batch))
        except Exception as err:  # noqa: BLE001 - each waiting request gets the failure and falls back
            for pending in batch:
                pending.future.set_exception(err)
            return
        for pending, (text, confidence), prompt, completion in zip(batch, answers, prompt_tokens, completion_tokens):
            if time.monotonic() >= pending.deadline:
                pending.future.set_exception(SlmTimeout("the SLM did not finish its answer in time"))
                continue
            message, finish_reason = answer_to_message(text)
            if completion >= pending.budget:
                finish_reason = "length"  # cut at the budget: not an answer to serve
            pending.future.set_result(SlmAnswer(message, text, confidence, finish_reason, prompt, completion, 0.0))


def _with_adapter(loaded: tuple[object, object], route: Route) -> tuple[object, object]:
    """A loaded base model (and tokenizer) with the route's adapter beside any others; a bare base
    model (loaded for an in-context route) becomes a PEFT model."""
    from peft import PeftModel

    model, tokenizer = loaded
    if isinstance(model, PeftModel):
        model.load_adapter(route.adapter_dir, adapter_name=route.key)
        return model, tokenizer
    return PeftModel.from_pretrained(model, route.adapter_dir, adapter_name=route.key).eval(), tokenizer


def answer_to_message(text: str) -> tuple[dict | None, str]:
    """(OpenAI assistant message, finish_reason) of an SLM's answer text; (None, reason) when it
    starts a tool call it does not finish as valid JSON."""
    calls = parse_tool_calls(text)
    if calls is None:
        if TOOL_CALL_OPEN in text:
            return None, "garbled tool call"
        return {"role": "assistant", "content": text}, "stop"
    before = text.split(TOOL_CALL_OPEN, 1)[0].strip()
    tool_calls = [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": call.get("name"), "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}}
        for call in calls
    ]
    return {"role": "assistant", "content": before or None, "tool_calls": tool_calls}, "tool_calls"


# ---------------------------------------------------------------------------------------------
# The trace log

ROUTER_LOG_FOLDER = "router"  # under the landing folder


def slm_model_name(route: Route) -> str:
    """What the trace log names as the model of a call a route's SLM answered."""
    return f"{ROUTER_SLM_MODEL_PREFIX}{route.key}"


def trace_record(request: dict, message: dict, *, trace_id: str, called_at: datetime, model: str,
                 finish_reason: str | None, usage: dict | None, latency_ms: float, origin: dict,
                 decision: dict, agent: str | None) -> dict:
    """One served call in the canonical trace format (docs/formats.md), with the router's
    decision beside it (`router`, which ingestion does not read)."""
    usage = usage or {}
    return {
        "trace_id": trace_id,
        "called_at": called_at.isoformat(timespec="milliseconds"),
        "messages": request.get("messages"),
        "tools": request.get("tools"),
        "response_message": message,
        "model": model,
        "finish_reason": finish_reason,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "latency_ms": round(latency_ms, 1),
        "agent": agent,
        "origin": origin,
        "router": decision,
    }


class TraceWriter:
    """Canonical JSON lines into `<landing>/router/`, one file per rotation (every `max_records`
    calls or `max_age_seconds`, and at close).

    The same policy as collection: the fields that say who made a call are replaced by keyed
    pseudonyms before anything is written (the same key makes a session's router calls group
    with its other calls), and with an encryption key (the raw zone's) each call is sealed on its
    own (Fernet) before it is written, one token per line (`router-*.jsonl.enc`), so no message
    text is ever on disk in the clear and memory holds one call, whatever the file's size;
    collection opens sealed files with the same key, a token at a time. Lines are appended to a
    file under a hidden name (collection skips hidden files) that is renamed when closed, so no
    file is visible half written, and files are owner-only (0600).
    """

    def __init__(self, landing_dir: Path, pseudonym_key: str | None, encryption_key: str | None = None,
                 max_records: int = 1000, max_age_seconds: float = 300.0):
        self.folder = Path(landing_dir) / ROUTER_LOG_FOLDER
        self.pseudonym_key = pseudonym_key
        self.encryption_key = encryption_key
        self.max_records = max_records
        self.max_age_seconds = max_age_seconds
        self._lock = threading.Lock()
        self._name: str | None = None  # the open file's final name; None: none open
        self._file = None  # the hidden file being appended to
        self._records = 0
        self._opened = 0.0
        self.written_files: list[Path] = []

    def origin(self, fields: dict) -> dict:
        """The request's origin fields, pseudonymized when there is a key."""
        fields = {k: v for k, v in fields.items() if v not in (None, "")}
        if self.pseudonym_key:
            return {k: rawzone.pseudonym(v, self.pseudonym_key) for k, v in fields.items()}
        return fields

    def write(self, record: dict) -> None:
        try:
            line = (json_text(record) + "\n").encode()
        except UnicodeEncodeError:  # a lone surrogate (a client's or upstream's `\ud800`): kept escaped, collection quarantines it
            line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        if self.encryption_key:
            line = rawzone.seal(line, self.encryption_key) + b"\n"
        with self._lock:
            if self._name is None:
                self._open()
            self._file.write(line)
            self._file.flush()
            self._records += 1
            if self._records >= self.max_records:
                self._close()

    def rotate_if_old(self) -> None:
        """Close the open file when it has been open longer than `max_age_seconds`."""
        with self._lock:
            if self._name is not None and time.monotonic() - self._opened >= self.max_age_seconds:
                self._close()

    def close(self) -> None:
        with self._lock:
            if self._name is not None:
                self._close()

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        self._name = f"router-{stamp}-{os.getpid()}.jsonl" + (rawzone.ENCRYPTED_SUFFIX if self.encryption_key else "")
        hidden = self.folder / f".{self._name}.partial"
        self._file = os.fdopen(os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self._records, self._opened = 0, time.monotonic()

    def _close(self) -> None:
        final = self.folder / self._name
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        (self.folder / f".{self._name}.partial").rename(final)
        self._file = None
        self.written_files.append(final)
        self._name = None
