"""Promotion: clusters whose SLM matched the baseline go to the router; the rest stay on the LLM.

The model registry:

    registry/
        router.yaml                   what the router serves now (schema: ROUTER_SCHEMA below)
        history.jsonl                 every promotion and rollback, one JSON line each
        cluster-2/v0001/              one promoted version of a route, never changed once written
            adapter/                  LoRA adapter and tokenizer (an encoder specialist: its whole model)
            eval.json                 its shadow-evaluation figures
            route.json                label, base model, threshold, match rule, training settings
            hashes.json               sha256 of every file of the version
        runs/0003/                    one pipeline run: summary.json, eval_report.json
        runs/LATEST                   the name of the newest run

A version folder is written under a temporary name and renamed when complete, and router.yaml
is replaced by a rename, so the router never reads half of either. router.yaml is the commit
point: a promotion's history lines are written first, naming the router.yaml version they lead
to, and a promotion killed before router.yaml was replaced is undone by the next write (its
lines and the versions only it wrote are removed; `history` never shows them). A run that does not promote
a route leaves the route's serving version as it was; `slm-convert rollback` moves a route back
to an earlier version (or off to the LLM).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist

import yaml

from pipeline.cluster import BUNDLED_EMBEDDER, DEFAULT_SIGNATURE
from pipeline.store import contained, make_owner_only, read_json, write_bytes, write_json

PROMOTED, NOT_PROMOTED = "promoted", "stays on LLM"
ROUTER_CONFIG, HISTORY, RUNS = "router.yaml", "history.jsonl", "runs"
# Where a route is sent back to the LLM: `slm-convert rollback ROUTE --to llm`.
OFF = "llm"

ROUTER_SCHEMA = """version: 12                       # increases with every write (promotion or rollback)
updated_at: 2026-11-23T07:00:00+00:00
fallback:                         # where calls go that no route answers confidently
  model: gpt-4.1
  base_url: https://api.openai.com/v1
  api_key_env: SLM_FALLBACK_API_KEY   # the key is read from this environment variable
routes:                           # one per promoted task cluster
  - name: cluster-2
    version: v0003                # registry/cluster-2/v0003/
    label: "classify intent"
    kind: generative              # generative: an SLM with a LoRA adapter; in_context: the base SLM shown
                                  # retrieved solved calls of the step (no training; served in-process);
                                  # classifier or span_tagger: an encoder specialist answering from the
                                  # request, served in-process
    match:                        # a call belongs to the route when the cosine similarity of
      centroid: [0.01, ...]       # its task-signature embedding to this centroid
      min_similarity: 0.41        # is at least this (nearest route wins)
      embedding_model: "bundled:all-MiniLM-L6-v2"   # the embedding clustering used
      signature: weighted_parts   # and its task signature (pipeline.cluster.SIGNATURES)
      step_segments: [9c0d...]    # only where the agent's steps share instructions (a preamble): the
                                  # segment keys of the instructions that tell its steps apart, the
                                  # only ones its signature reads (pipeline.cluster.step_instruction_segments)
      system_prompts: [3f9a0c1d2e4b5a67]   # or, before any embedding: a call whose system prompt
                                  # has one of these keys (pipeline.calls.system_prompt_key; each carried
                                  # in training data only by this cluster's calls) belongs to the route
    base_model: smollm2-135m-instruct
    base_model_path: /path/to/model-cache/smollm2-135m-instruct
    adapter: cluster-2/v0003/adapter   # relative to the registry folder (an encoder specialist's model,
                                  # an in_context route's example bank)
    confidence_threshold: 0.62    # below it the call is escalated to the fallback
    max_new_tokens: 48            # the answer budget shadow evaluation used for this route
"""


# What a version written before the router recorded these was made with: clustering's defaults.
DEFAULT_MATCH_EMBEDDING = {"model": BUNDLED_EMBEDDER, "signature": DEFAULT_SIGNATURE}
DEFAULT_MAX_NEW_TOKENS = 160


def quality_lower_bound(mean_score: float, calls: int, confidence: float) -> float:
    """One-sided lower confidence bound of a mean score in [0, 1] over `calls` calls.

    Wilson's score bound, treating each score as a success or failure: of all variables in
    [0, 1] with a given mean, the 0/1 one has the largest variance, so partial scores only make
    the true bound tighter than this one. A handful of lucky calls gives a low bound.
    """
    if calls <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    p = min(max(mean_score, 0.0), 1.0)
    spread = z * math.sqrt(p * (1 - p) / calls + z * z / (4 * calls * calls))
    return max(0.0, (p + z * z / (2 * calls) - spread) / (1 + z * z / calls))


def calls_to_clear(quality_floor: float, confidence: float, score: float = 1.0, limit: int = 100_000) -> int | None:
    """The fewest answered calls on which a mean `score` (1.0: every answer right) has a lower
    bound at or above the floor; None when no number of calls up to `limit` would do."""
    if quality_lower_bound(score, limit, confidence) < quality_floor:
        return None
    low, high = 1, limit
    while low < high:  # the bound rises with the number of calls
        middle = (low + high) // 2
        low, high = (middle + 1, high) if quality_lower_bound(score, middle, confidence) < quality_floor else (low, middle)
    return low


def promotion_decision(
    evaluation: dict | None, quality_floor: float, min_holdout: int, confidence: float = 0.95
) -> tuple[str, str]:
    """(decision, reason) for one cluster from its shadow-evaluation summary.

    Non-inferiority: the SLM's score against the baseline on the test calls it would answer
    (those at or above the threshold calibrated on the other held-out calls) must be at least
    `quality_floor` (1 - the margin tolerated against the baseline) with `confidence`, not only
    on average.
    """
    if evaluation is None:
        return NOT_PROMOTED, "not fine-tuned"
    if evaluation["test_calls"] < min_holdout:
        return NOT_PROMOTED, f"only {evaluation['test_calls']} held-out test calls (< {min_holdout})"
    needed = calls_to_clear(quality_floor, confidence)
    if needed is None or evaluation["test_calls"] < needed:
        return NOT_PROMOTED, (f"underpowered: {evaluation['test_calls']} test calls cannot clear floor {quality_floor:g} "
                              f"at {confidence:.0%} even if all correct (it takes {needed})")
    if evaluation["confidence_threshold"] is None:
        score = evaluation["score_vs_baseline"]
        return NOT_PROMOTED, f"shadow score {score:.3f}: no confidence threshold keeps the answered calls at the floor"
    answered = evaluation["answered_at_threshold"]
    score = evaluation["score_at_threshold"]
    if not answered:  # the threshold chosen on the calibration calls keeps none of the test calls
        return NOT_PROMOTED, (f"at its threshold {evaluation['confidence_threshold']:.3f} the SLM would answer none of "
                              f"the {evaluation['test_calls']} test calls")
    bound = quality_lower_bound(score, answered, confidence)
    stated = f"score {score:.3f} on the {answered} calls it would answer, {confidence:.0%} lower bound {bound:.3f}"
    if bound < quality_floor:
        return NOT_PROMOTED, f"{stated} is below the floor {quality_floor:.3f}"
    return PROMOTED, f"{stated} meets the floor {quality_floor:.3f}"


def serving_cost(evaluation: dict) -> float:
    """What a candidate costs to serve per 1,000 calls, as shadow evaluation measured it (its
    batched generation time on this hardware at its price); unknown costs last."""
    cost = (evaluation.get("cost_and_speed") or {}).get("slm_cost_per_1000_calls")
    return float("inf") if cost is None else float(cost)


def choose_candidate(evaluations: list[dict], quality_floor: float, min_holdout: int,
                     confidence: float = 0.95) -> tuple[dict | None, str, str, list[dict]]:
    """(chosen evaluation, decision, reason, every candidate's decision) for one cluster whose
    candidates (kinds of specialist) were each shadow-evaluated on the same held-out calls: the
    cheapest to serve of those that pass the gate (`promotion_decision`, unchanged), else the
    first candidate measured (the cluster's primary kind) with its own reason."""
    if not evaluations:
        decision, reason = promotion_decision(None, quality_floor, min_holdout, confidence)
        return None, decision, reason, []
    measured = []
    for evaluation in evaluations:
        decision, reason = promotion_decision(evaluation, quality_floor, min_holdout, confidence)
        measured.append({"kind": evaluation.get("kind"), "decision": decision, "reason": reason,
                         **{k: evaluation.get(k) for k in ("score_vs_baseline", "confidence_threshold",
                                                           "coverage_at_threshold", "score_at_threshold")},
                         "slm_cost_per_1000_calls": (evaluation.get("cost_and_speed") or {}).get("slm_cost_per_1000_calls")})
    passing = [i for i, m in enumerate(measured) if m["decision"] == PROMOTED]
    chosen = min(passing, key=lambda i: serving_cost(evaluations[i])) if passing else 0
    measured[chosen]["chosen"] = True
    reason = measured[chosen]["reason"]
    if len(passing) > 1:
        reason += f"; the cheapest to serve of the {len(passing)} kinds that pass"
    return evaluations[chosen], measured[chosen]["decision"], reason, measured


SERVING_MAX_RANK = 16  # vLLM's default --max-lora-rank


def servability_problems(adapter_dir: Path, base_model_path: str, max_rank: int = SERVING_MAX_RANK,
                         allow_extra_modules: bool = False) -> list[str]:
    """Why a LoRA serving stack (PEFT, vLLM's multi-LoRA server) could not serve this adapter
    on the route's base model; empty when it can. Reads configs and tensor names, not weights."""
    from safetensors import SafetensorError, safe_open

    config_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        return [f"{adapter_dir} is not a PEFT adapter (adapter_config.json and adapter_model.safetensors)"]
    try:
        config = json.loads(config_path.read_text())
        with safe_open(str(weights), "pt") as tensors:
            names = list(tensors.keys())
    except (ValueError, OSError, SafetensorError) as err:
        return [f"{adapter_dir} does not load: {err}"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if config.get("base_model_name_or_path") != base_model_path:
        problems.append(f"trained on {config.get('base_model_name_or_path')!r}, the route serves {base_model_path!r}")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        problems.append(f"LoRA rank {max(ranks)} is above the serving limit {max_rank}")
    extra = [n for n in names if "lora_" not in n]
    if (config.get("modules_to_save") or extra) and not allow_extra_modules:
        problems.append(f"full weights beside LoRA ({config.get('modules_to_save') or extra[:3]}); not allowed")
    if not (adapter_dir / "chat_template.jinja").is_file() and "chat_template" not in _json_or_empty(
            adapter_dir / "tokenizer_config.json"):
        problems.append("no chat template beside the adapter")
    return problems


def missing_files(kind: str, folder: Path) -> list[str]:
    """The files a specialist's folder of this kind cannot be served without that it lacks: an
    encoder specialist's model and its record, or a LoRA adapter's config and weights."""
    from pipeline import encoders

    from pipeline import incontext

    needed = ((encoders.SPECIALIST_FILE, "model.safetensors") if kind in encoders.ENCODER_KINDS
              else incontext.NEEDED_FILES if kind == encoders.IN_CONTEXT
              else ("adapter_config.json", "adapter_model.safetensors"))
    return [name for name in needed if not (Path(folder) / name).is_file()]


def specialist_problems(kind: str, adapter_dir: Path, base_model_path: str, max_rank: int = SERVING_MAX_RANK,
                        allow_extra_modules: bool = False) -> list[str]:
    """`servability_problems` for a route of any kind: an encoder specialist is checked as one."""
    from pipeline import encoders

    if kind in encoders.ENCODER_KINDS:
        return encoders.servability_problems(adapter_dir)
    if kind == encoders.IN_CONTEXT:
        from pipeline import incontext

        return incontext.servability_problems(adapter_dir, base_model_path)
    return servability_problems(adapter_dir, base_model_path, max_rank, allow_extra_modules)


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


HASHES_FILE = "hashes.json"


def version_problems(registry: Path, adapter: str) -> list[str]:
    """Why a router.yaml entry's adapter (`<route>/<version>/adapter`) may not be served: a path
    that leads outside the registry (an absolute one, `..`, a link elsewhere), or a version whose
    files are not the ones promotion wrote (its hashes.json). Whoever can change router.yaml or a
    bucket object must not thereby make the router load other files."""
    parts = str(adapter).split("/")
    if len(parts) != 3 or parts[2] != "adapter":
        return [f"adapter {adapter!r} is not <route>/<version>/adapter inside the registry"]
    adapter_dir = contained(registry, str(adapter))
    if adapter_dir is None or contained(registry, f"{parts[0]}/{parts[1]}") is None:
        return [f"adapter {adapter!r} leads outside the registry {registry}"]
    version_dir = adapter_dir.parent
    recorded_path = version_dir / HASHES_FILE
    if not recorded_path.is_file():
        return [f"{version_dir} has no {HASHES_FILE}: it was not written by promotion"]
    recorded = read_json(recorded_path)
    found = {name: digest for name, digest in file_hashes(version_dir).items() if name != HASHES_FILE}
    changed = sorted(name for name in set(recorded) | set(found) if recorded.get(name) != found.get(name))
    return [f"{version_dir}: files differ from {HASHES_FILE} ({', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}): the version was changed after promotion"] if changed else []


def _versions(registry: Path, route: str) -> list[str]:
    folder = registry / route
    return sorted(p.name for p in folder.glob("v[0-9]*") if p.is_dir()) if folder.is_dir() else []


def next_version(registry: Path, route: str) -> str:
    versions = _versions(registry, route)
    return f"v{int(versions[-1][1:]) + 1 if versions else 1:04d}"


def write_route_version(registry: Path, route: dict, evaluation: dict, version: str) -> None:
    """Copy one promoted adapter into registry/<route>/<version>/ (from `next_version`).

    `route`: name, label, base_model, base_model_path, adapter_dir, threshold, centroid,
    min_similarity, match_embedding (the embedding model and signature of the centroid), training.
    """
    staging = registry / route["name"] / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(route["adapter_dir"], staging / "adapter")
    write_json(staging / "eval.json", evaluation)
    write_json(staging / "route.json", {k: v for k, v in route.items() if k != "adapter_dir"})
    write_json(staging / HASHES_FILE, file_hashes(staging))
    make_owner_only(staging)
    staging.rename(registry / route["name"] / version)


def read_router_config(registry: Path) -> dict:
    path = registry / ROUTER_CONFIG
    return yaml.safe_load(path.read_text()) if path.exists() else {"version": 0, "routes": []}


def router_entry(registry: Path, name: str, version: str) -> dict:
    """The router.yaml entry of one registry version of a route."""
    route = read_json(registry / name / version / "route.json")
    evaluation = read_json(registry / name / version / "eval.json")
    embedding = route.get("match_embedding") or {}
    return {
        "name": name,
        "version": version,
        "label": route["label"],
        "kind": route.get("kind", "generative"),
        "match": {"centroid": route["centroid"], "min_similarity": route["min_similarity"],
                  "embedding_model": embedding.get("model", DEFAULT_MATCH_EMBEDDING["model"]),
                  "signature": embedding.get("signature", DEFAULT_MATCH_EMBEDDING["signature"]),
                  **({"step_segments": embedding["step_segments"]} if embedding.get("step_segments") is not None else {}),
                  "system_prompts": route.get("system_prompts", [])},
        "base_model": route["base_model"],
        "base_model_path": route["base_model_path"],
        "adapter": f"{name}/{version}/adapter",
        "confidence_threshold": route["threshold"],
        "max_new_tokens": evaluation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
    }


def write_router_config(registry: Path, routes: list[dict], fallback: dict) -> dict:
    """Replace router.yaml in one rename; its `version` counts every write."""
    router = {
        "version": read_router_config(registry)["version"] + 1,
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fallback": fallback,
        "routes": sorted(routes, key=lambda r: r["name"]),
    }
    write_bytes(registry / ROUTER_CONFIG, yaml.safe_dump(router, sort_keys=False, width=120).encode())
    return router


def log_events(registry: Path, events: list[dict]) -> None:
    """Add promotion or rollback lines to history.jsonl. The file is replaced whole in one
    rename, so a crash never leaves half a line."""
    registry.mkdir(parents=True, exist_ok=True)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_history(registry, [*_history_lines(registry), *({"at": at, **event} for event in events)])


def _write_history(registry: Path, lines: list[dict]) -> None:
    write_bytes(registry / HISTORY, "".join(json.dumps(line) + "\n" for line in lines).encode())


def _history_lines(registry: Path) -> list[dict]:
    path = registry / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def history(registry: Path) -> list[dict]:
    """Every promotion and rollback that took effect, oldest first."""
    served = read_router_config(registry)["version"]
    return [e for e in _history_lines(registry) if e.get("router_version", 0) <= served]


def forget_unfinished(registry: Path) -> int:
    """Undo what a promotion or rollback killed before it replaced router.yaml left: its history
    lines (each written first, naming the router.yaml version it was about to write) and the
    route versions that only it wrote. router.yaml is the commit point: a change that did not
    reach it never happened. Returns how many history lines were dropped."""
    served = read_router_config(registry)["version"]
    lines = _history_lines(registry)
    unfinished = [e for e in lines if e.get("router_version", 0) > served]
    for event in unfinished:
        if event["action"] == "promote":
            shutil.rmtree(registry / event["route"] / event["version"], ignore_errors=True)
    if unfinished:
        _write_history(registry, [e for e in lines if e not in unfinished])
    return len(unfinished)


def promote_routes(registry: Path, promoted: list[tuple[dict, dict]], fallback: dict, run: str) -> dict:
    """Write a version for each promoted (route, evaluation) and the new router.yaml. Routes
    not promoted by this run keep the version they serve. Returns the router config."""
    forget_unfinished(registry)
    router = read_router_config(registry)
    serving = {r["name"]: r for r in router["routes"]}
    versions = {route["name"]: next_version(registry, route["name"]) for route, _ in promoted}
    # logged first, with the router.yaml version they lead to: if the process dies before
    # router.yaml is replaced, the next write finds them unfinished and undoes them
    log_events(registry, [{"action": "promote", "route": route["name"], "version": versions[route["name"]],
                           "replaces": serving.get(route["name"], {}).get("version"), "run": run,
                           "router_version": router["version"] + 1} for route, _ in promoted])
    for route, evaluation in promoted:
        write_route_version(registry, route, evaluation, versions[route["name"]])
        serving[route["name"]] = router_entry(registry, route["name"], versions[route["name"]])
    return write_router_config(registry, list(serving.values()), fallback)


def rollback(registry: Path, route: str, to: str | None = None) -> dict:
    """Point `route` at an earlier version (default: the one before the version it serves), or
    take it off to the LLM with `to=OFF`. Returns the new router config."""
    forget_unfinished(registry)
    router = read_router_config(registry)
    serving = {r["name"]: r for r in router["routes"]}
    current = serving.get(route, {}).get("version")
    versions = _versions(registry, route)
    if not versions:
        known = ", ".join(sorted(p.name for p in registry.iterdir() if (p / "v0001").is_dir())) if registry.exists() else ""
        raise ValueError(f"no route {route!r} in {registry} (routes: {known or 'none'})")
    if to is None:
        if current is None:
            raise ValueError(f"{route} is not served now; name a version with --to ({', '.join(versions)})")
        earlier = [v for v in versions if v < current]
        if not earlier:
            raise ValueError(f"{route} serves {current}, its first version; `--to {OFF}` sends its calls to the LLM")
        to = earlier[-1]
    if to == OFF:
        serving.pop(route, None)
    elif to not in versions:
        raise ValueError(f"{route} has no version {to!r} (versions: {', '.join(versions)})")
    else:
        serving[route] = router_entry(registry, route, to)
    log_events(registry, [{"action": "rollback", "route": route, "version": to, "replaces": current,
                           "router_version": router["version"] + 1}])
    return write_router_config(registry, list(serving.values()), router["fallback"])


def routed_share(registry: Path, router: dict, cluster_shares: dict[str, float]) -> float:
    """The share of all calls the router would answer with SLMs: for each served route, its
    cluster's share of the traffic times the coverage its version reached on its test calls."""
    total = 0.0
    for route in router["routes"]:
        evaluation = read_json(registry / route["name"] / route["version"] / "eval.json")
        total += cluster_shares.get(route["name"], 0.0) * evaluation.get("coverage_at_threshold", 0.0)
    return round(total, 4)


LEARNING_CURVES = "learning_curves.png"


def write_run_report(registry: Path, run: str, eval_report: dict, summary: dict, plot_png: bytes | None = None,
                     curves_png: bytes | None = None) -> Path:
    """registry/runs/<run>/ (`run` from `next_run`, the number the run's promotions were logged
    under) with the run's summary, eval report and report (markdown, HTML, coverage/quality
    plot, and the learning curves of the specialists that recorded one); runs/LATEST names it."""
    runs = registry / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    staging = runs / f".{run}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    final = runs / run
    summary = {**summary, "run": run, "paths": {**summary.get("paths", {}),
                                                 "router_config": str(registry / ROUTER_CONFIG),
                                                 "eval_report": str(final / "eval_report.json"),
                                                 "summary": str(final / "summary.json")}}
    write_json(staging / "eval_report.json", eval_report)
    write_json(staging / "summary.json", summary)
    plot = "coverage_quality.png" if plot_png else None
    if plot_png:
        write_bytes(staging / plot, plot_png)
    curves = LEARNING_CURVES if curves_png else None
    if curves_png:
        write_bytes(staging / curves, curves_png)
    write_bytes(staging / "report.md", run_report_markdown(summary, plot, curves).encode())
    write_bytes(staging / "report.html", run_report_html(summary, plot, curves).encode())
    staging.rename(final)
    write_bytes(runs / "LATEST", f"{run}\n".encode())
    return final


def next_run(registry: Path) -> str:
    runs = registry / RUNS
    existing = [int(p.name) for p in runs.iterdir() if p.is_dir() and p.name.isdigit()] if runs.is_dir() else []
    return f"{max(existing, default=0) + 1:04d}"


def latest_run(registry: Path) -> Path:
    """The folder of the newest run's report."""
    latest = registry / RUNS / "LATEST"
    if not latest.exists():
        raise FileNotFoundError(f"No run report under {registry}: run `slm-convert run` first")
    return registry / RUNS / latest.read_text().strip()


def vllm_serving_commands(registry: Path, router: dict) -> str:
    """How to serve the promoted adapters with vLLM's multi-LoRA server (one server per base
    model, every route's adapter loaded beside it)."""
    if not router["routes"]:
        return "No promoted routes: nothing to serve; every call goes to the fallback model."
    by_base: dict[str, list[dict]] = {}
    in_process = [r["name"] for r in router["routes"] if r.get("kind", "generative") not in ("generative", "in_context")]
    in_context = [r["name"] for r in router["routes"] if r.get("kind") == "in_context"]
    for route in router["routes"]:
        if route.get("kind", "generative") == "generative":
            by_base.setdefault(route["base_model_path"], []).append(route)
    lines = [f"Encoder specialists ({', '.join(in_process)}) are served by slm-router itself, in-process."] if in_process else []
    if in_context:
        lines.append(f"Base SLMs with retrieved examples ({', '.join(in_context)}) are served by slm-router itself, "
                     "in-process (the base model, no adapter).")
    if not by_base:
        return "\n".join(lines + ["No generative route: no vLLM server is needed."])
    for base, routes in by_base.items():
        modules = " ".join(f"{r['name']}={registry / r['adapter']}" for r in routes)
        rank = max(json.loads((registry / r["adapter"] / "adapter_config.json").read_text())["r"] for r in routes)
        lines.append(f"vllm serve {base} --enable-lora --max-lora-rank {max(rank, 8)} --max-loras {len(routes)} "
                     f"--lora-modules {modules}")
    lines.append("Then ask for a route by name: POST /v1/chat/completions with \"model\": \"<route name>\".")
    return "\n".join(lines)


def _evaluation_lines(evaluation: dict) -> list[str]:
    threshold = evaluation["confidence_threshold"]
    lines = [f"test calls {evaluation['test_calls']} (threshold from {evaluation['calibration_calls']} others): " + (
        f"at confidence >= {threshold:.3f} the SLM answers {evaluation['coverage_at_threshold']:.0%} "
        f"with score {evaluation['score_at_threshold'] if evaluation['score_at_threshold'] is not None else 0:.3f}"
        if threshold is not None else "no threshold reached the floor on the calibration calls")]
    if evaluation.get("calls_under_other_instructions"):
        lines.append(f"{evaluation['calls_under_other_instructions']} held-out calls came under other instructions (system "
                     "prompt or tools) than training: the router escalates such calls as 'instructions changed'")
    if "arms" in evaluation:
        arms = evaluation["arms"]
        in_context = f"in-context {arms['base_in_context']:.3f}, " if "base_in_context" in arms else ""
        lines.append(f"on {arms['calls']} test calls: base SLM zero-shot {arms['base_zero_shot']:.3f}, {in_context}"
                     f"fine-tuned {arms['fine_tuned']:.3f}")
    if evaluation.get("feedback"):
        feedback = evaluation["feedback"]
        lines.append(f"outcome feedback on {feedback['calls_with_feedback']} calls: baseline accuracy "
                     f"{feedback['baseline_accuracy']:.2f}, SLM at least {feedback['slm_accuracy_lower_bound']:.2f}")
    cost = evaluation.get("cost_and_speed")
    if cost and cost["slm_latency_ms_batch_1"] and cost["llm_logged_latency_ms"]:
        lines.append(f"latency p50 SLM {cost['slm_latency_ms_batch_1']['p50']:.0f} ms (batch 1, this machine) vs LLM "
                     f"{cost['llm_logged_latency_ms']['p50']:.0f} ms (logged); per 1,000 calls SLM "
                     f"${cost['slm_cost_per_1000_calls']:.4f} vs LLM ${cost['llm_cost_per_1000_calls'] or 0:.4f}")
    return lines


REPORT_COLUMNS = ["cluster", "label", "traffic share", "SLM", "score vs baseline (test)", "threshold",
                  "coverage", "score at threshold", "LLM/SLM latency (p50)", "LLM/SLM cost", "decision"]


def report_rows(summary: dict) -> list[list[str]]:
    """One row per cluster of the run report (REPORT_COLUMNS)."""
    rows = []
    for c in summary["clusters"]:
        evaluation = c["shadow_eval"] or {}
        cost = evaluation.get("cost_and_speed") or {}
        slm_p50 = (cost.get("slm_latency_ms_batch_1") or {}).get("p50")
        llm_p50 = (cost.get("llm_logged_latency_ms") or {}).get("p50")
        number = lambda value, form: "–" if value is None else format(value, form)  # noqa: E731
        rows.append([
            c["name"], c["label"], f"{c['share']:.1%}", specialist_name(c["selection"], _measured_kind(c)),
            number(evaluation.get("score_vs_baseline"), ".3f"), number(evaluation.get("confidence_threshold"), ".3f"),
            number(evaluation.get("coverage_at_threshold"), ".0%"), number(evaluation.get("score_at_threshold"), ".3f"),
            f"{llm_p50 / slm_p50:.1f}x" if slm_p50 and llm_p50 else "–",
            number(cost.get("cost_ratio_llm_to_slm"), ".1f") + ("x" if cost.get("cost_ratio_llm_to_slm") else ""),
            f"{c['promotion']['decision']}: {c['promotion']['reason']}",
        ])
        for other in _other_candidates(c):  # measured on the same calls, not chosen
            rows.append([
                "", "also measured", "", specialist_name(c["selection"], other["kind"]),
                number(other["score_vs_baseline"], ".3f"), number(other["confidence_threshold"], ".3f"),
                number(other["coverage_at_threshold"], ".0%"), number(other["score_at_threshold"], ".3f"), "–", "–",
                f"{other['decision']}: {other['reason']}",
            ])
    return rows


def run_report_markdown(summary: dict, plot: str | None = "coverage_quality.png", curves: str | None = None) -> str:
    """The run's report for a person, in markdown; `plot`: the coverage/quality image's URL,
    `curves`: the learning curves' image's."""
    counts = summary["counts"]
    lines = [
        f"# slm-convert run {summary['run']} ({summary['run_at']})",
        "",
        f"{counts['curated_traces']['curated']} curated calls in {counts['task_clusters']['clusters']} task clusters; "
        f"{counts['promoted_routes']} route(s) promoted this run, the router serves {counts['served_routes']} and would "
        f"answer about {counts['share_of_calls_to_slms']:.0%} of all calls with SLMs. Quality floor {summary['quality_floor']}; "
        "scores are against the logged LLM answer on held-out test calls; the threshold was chosen on other held-out calls.",
        "",
        "| " + " | ".join(REPORT_COLUMNS) + " |",
        "|" + "---|" * len(REPORT_COLUMNS),
        *["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in report_rows(summary)],
    ]
    if plot:
        lines += ["", f"![coverage and quality per cluster]({plot})"]
    if curves:
        lines += ["", f"![learning curves: score on the calibration calls by training examples seen]({curves})"]
    return "\n".join(lines) + "\n"


def run_report_html(summary: dict, plot: str | None = "coverage_quality.png", curves: str | None = None) -> str:
    """The same report as a standalone HTML page."""
    from html import escape

    counts = summary["counts"]
    head = "".join(f"<th>{escape(c)}</th>" for c in REPORT_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in report_rows(summary))
    image = f'<p><img alt="coverage and quality per cluster" src="{escape(plot)}"></p>' if plot else ""
    if curves:
        image += f'<p><img alt="learning curves" src="{escape(curves)}"></p>'
    return (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>slm-convert run {escape(summary['run'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>"
        f"<h1>slm-convert run {escape(summary['run'])}</h1>"
        f"<p>{counts['curated_traces']['curated']} curated calls in {counts['task_clusters']['clusters']} task clusters; "
        f"{counts['promoted_routes']} route(s) promoted this run; the router serves {counts['served_routes']} and would "
        f"answer about {counts['share_of_calls_to_slms']:.0%} of all calls with SLMs.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{image}</body></html>\n"
    )


def specialist_name(selection: dict, kind: str | None = None) -> str:
    """What answers a cluster's calls: the LLM, or the chosen model and its kind of specialist
    (`kind`: the one measured, where selection named several)."""
    if not selection.get("candidate"):
        return "LLM"
    kind = kind or selection.get("kind") or "generative"
    model = (selection.get("generator") or selection["candidate"]) if kind in ("generative", "in_context") else selection["candidate"]
    return model if kind == "generative" else f"{model} {kind}"


def _other_candidates(cluster: dict) -> list[dict]:
    """The kinds of specialist measured for a cluster beside the one its row reports."""
    return [m for m in cluster["promotion"].get("candidates") or [] if not m.get("chosen")]


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _measured_kind(cluster: dict) -> str | None:
    return (cluster["shadow_eval"] or {}).get("kind") or cluster["selection"].get("kind")


def format_summary(summary: dict) -> str:
    """The run's outcome for a person: what was found, chosen, scored and promoted."""
    counts = summary["counts"]
    raw, curated = counts["raw_traces"], counts["curated_traces"]
    lines = [
        f"Calls collected: {raw['calls']} new from {raw['files_read']} files ({raw['quarantined']} lines quarantined, "
        f"{raw['repeated_records']} already collected, {raw['files_unchanged']} files unchanged since the last run)",
        f"Curated: {curated['curated']} calls ({curated['exact_duplicates']} exact and {curated['near_duplicates']} near "
        f"duplicates and {curated['unusable']} unusable removed; {curated['kept_out_of_training']} kept out of training "
        f"for negative feedback; {sum(curated['pii_findings'].values())} personal-data spans replaced; "
        f"{curated.get('possible_personal_data', 0)} set aside as possibly holding personal data after scrubbing)",
        f"Task clusters: {counts['task_clusters']['clusters']} "
        f"({counts['task_clusters']['unclustered_calls']} calls unclustered, kept on the LLM)",
        "",
        f"{'cluster':<11} {'calls':>6}  {'label':<34} {'specialist':<32} {'score':>6} {'floor':>6}  decision",
    ]
    for c in summary["clusters"]:
        evaluation = c["shadow_eval"]
        score = f"{evaluation['score_vs_baseline']:.3f}" if evaluation else "-"
        lines.append(
            f"{c['name']:<11} {c['size']:>6}  {c['label'][:34]:<34} {specialist_name(c['selection'], _measured_kind(c)):<32} "
            f"{score:>6} {summary['quality_floor']:>6.2f}  {c['promotion']['decision']}: {c['promotion']['reason']}"
        )
        for other in _other_candidates(c):
            lines.append(f"{'':<11} {'':>6}  {'also measured':<34} {specialist_name(c['selection'], other['kind']):<32} "
                         f"{_score(other['score_vs_baseline']):>6} "
                         f"{'':>6}  {other['decision']}: {other['reason']}")
        if c["selection"]["decision"] != "fine-tune" or c["selection"].get("kind") not in (None, "generative"):
            lines.append(f"{'':<11} {'':>6}  selection: {c['selection']['reason']}")
        if evaluation:
            lines += [f"{'':<11} {'':>6}  {line}" for line in _evaluation_lines(evaluation)]
    lines += [
        "",
        f"Promoted routes: {counts['promoted_routes']} of {len(summary['clusters'])} clusters this run; "
        f"the router serves {counts['served_routes']} (run {summary['run']}), answering about "
        f"{counts['share_of_calls_to_slms']:.0%} of all calls with SLMs",
        f"Router config: {summary['paths']['router_config']}",
        f"Summary:       {summary['paths']['summary']}",
        "",
        "Serving:",
        summary["serving"],
    ]
    return "\n".join(lines)
