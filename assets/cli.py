"""`slm-convert`: prepare the offline models, run the whole asset graph, print its summary.

    slm-convert prepare-models      convert the bundled base model into the model cache
    slm-convert run [--config F]    materialize every asset (run config from a YAML file)
    slm-convert summary             print the summary of the newest run
    slm-convert replay [--calls N]  send the newest run's held-out calls through slm-router
                                    (loopback; fallback: the LLM's logged answers)
    slm-convert routes              what the router serves, each route's versions, the history
    slm-convert rollback ROUTE [--to VERSION|llm]
                                    serve an earlier version of a route (default: the one
                                    before), or send its calls to the LLM

The landing and output folders come from SLM_LANDING_DIR and SLM_OUTPUT_DIR (defaults:
data/landing and output/ in the repository).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from assets.resources import REPO_ROOT, pipeline_store_from_env, resources_from_env
from pipeline import ingest, models, sources
from pipeline import promote
from pipeline.promote import format_summary, latest_run
from pipeline.store import Store, exclusive, read_json, write_owner_only


def prepare_models(cache: Path, candidates_file: Path) -> None:
    for candidate in models.load_candidates(candidates_file):
        if candidate.source != "bundled-gguf":
            continue
        started = time.monotonic()
        path = models.resolve_model_dir(candidate, cache)
        print(f"{candidate.name}: ready in {path} ({time.monotonic() - started:.0f}s)")


def latest_summary(store: Store) -> dict:
    return read_json(latest_run(store.registry) / "summary.json")


def describe_routes(registry: Path) -> str:
    router = promote.read_router_config(registry)
    lines = [f"router.yaml version {router['version']} ({registry / promote.ROUTER_CONFIG})"]
    for route in router["routes"]:
        versions = sorted(p.name for p in (registry / route["name"]).glob("v[0-9]*"))
        lines.append(f"  {route['name']}: serves {route['version']} (threshold {route['confidence_threshold']:.3f}); "
                     f"versions {', '.join(versions)}")
    if not router["routes"]:
        lines.append("  no routes: every call goes to the fallback model")
    events = promote.history(registry)[-10:]
    if events:
        lines.append("history (newest last):")
        lines += [f"  {e['at']} {e['action']} {e['route']} -> {e['version']} (was {e['replaces'] or 'LLM'})" for e in events]
    return "\n".join(lines)


def replay_held_out_calls(store: Store, limit: int) -> str:
    """Send held-out calls through slm-router over the run's registry; its summary, also kept as
    replay.json beside the run's report."""
    from transformers.utils import logging as transformers_logging

    from pipeline import replay
    from pipeline.store import read_table, write_json

    transformers_logging.disable_progress_bar()  # the router loads its specialists: no bars in the summary

    calls = replay.held_out_calls(read_table(store.table("curated_traces")), read_table(store.table("task_clusters")),
                                  read_table(store.evaluation / "predictions.parquet"), limit=limit)
    print(f"Replaying {len(calls)} held-out calls through slm-router...", flush=True)
    summary = replay.replay(store.registry, calls)
    write_json(latest_run(store.registry) / "replay.json", summary)
    return replay.format_replay(summary)


def run(config_file: Path | None, replay_calls: int = 300) -> int:
    import dagster as dg

    from assets import run_config as run_configs
    from assets.data import daily_calls
    from assets.definitions import all_assets, all_checks, defs, stage_configs

    run_config = run_configs.load_run_config(config_file) if config_file else {}
    # every problem of the config at once, before any stage runs
    run_configs.check(defs.resolve_job_def("slm_conversion"), run_config, stage_configs, str(config_file))
    # Progress and results, not every engine event: Dagster's DEBUG lines drown the stage logs.
    run_config.setdefault("loggers", {"console": {"config": {"log_level": "INFO"}}})
    resources = resources_from_env(resolve=True)
    resource = resources["pipeline_store"]
    # Bad input found before Dagster starts gets one clear line instead of a step failure.
    ingest.readable_landing_files(resource.landing())
    print(f"landing folder: {resource.landing_dir}\noutput folder:  {resource.output_dir}", flush=True)
    started = time.monotonic()
    # A persistent instance makes the run visible in `dagster dev` afterwards; the repository's
    # .dagster_home also turns Dagster's telemetry off.
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster_home"))
    instance = dg.DagsterInstance.get()
    result = dg.materialize(
        [*all_assets, *all_checks],
        resources=resources,
        run_config=run_config,
        instance=instance,
        # collection takes in every new file whatever the day; the run is filed under today's
        partition_key=daily_calls.get_last_partition_key(),
        raise_on_error=False,
    )
    if not result.success:
        print(f"\nThe run failed: {_failure_reason(result)}", file=sys.stderr)
        return 1
    print(f"\nFinished in {time.monotonic() - started:.0f}s\n")
    print(format_summary(latest_summary(resource.store())))
    if replay_calls and resource.mirror() is None:
        print("\n" + replay_after_run(resource.store(), replay_calls))
    return 0


def replay_after_run(store: Store, limit: int) -> str:
    """The replay's summary, or why there is none: the run itself has finished and stands, so a
    replay that cannot run is said in one line, not as a failed run."""
    try:
        return replay_held_out_calls(store, limit)
    except Exception as err:  # noqa: BLE001 - the run's outcome is already written; only the demo's extra step failed
        return f"Router replay skipped: {type(err).__name__}: {err} (run `slm-convert replay` to try again)"


def _failure_reason(result) -> str:
    """Why the run stopped: the failed blocking checks, each with what it found, where and what
    next (`assets.metadata.check_result`), or else the error of the first failed step, without its
    traceback (that is in the logs above)."""
    checks = [c for c in result.get_asset_check_evaluations() if not c.passed and c.blocking]
    if checks:
        return "\n".join(f"blocking check {c.check_name} on {c.asset_key.to_user_string()} failed: "
                         f"{c.description or 'see its metadata in the Dagster UI'}" for c in checks)
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            error = event.step_failure_data.error
            while error.cause is not None and error.cls_name == "DagsterExecutionStepExecutionError":
                error = error.cause
            message = error.message.strip()
            qualified, _, rest = message.partition(": ")
            if qualified.endswith(error.cls_name):  # "dagster...Failure: text" -> "text"
                message = rest
            return f"step {event.step_key}: {message}"
    return "see the Dagster logs above"


def main(argv: list[str] | None = None) -> int:
    write_owner_only()  # the output folder and the Dagster instance's databases too
    parser = argparse.ArgumentParser(prog="slm-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare-models", help="convert the bundled base model into the model cache")
    prepare.add_argument("--candidates", type=Path, default=REPO_ROOT / "configs" / "candidates.yaml")
    run_parser = commands.add_parser("run", help="materialize the whole asset graph and print the summary")
    run_parser.add_argument("--config", type=Path, help="Dagster run config (YAML), e.g. configs/gpu.yaml")
    run_parser.add_argument("--replay-calls", type=int, default=300,
                            help="held-out calls sent through slm-router after the run (0: none)")
    commands.add_parser("summary", help="print the summary of the newest run")
    replay_parser = commands.add_parser("replay", help="send the newest run's held-out calls through slm-router")
    replay_parser.add_argument("--calls", type=int, default=300, help="at most this many calls")
    commands.add_parser("routes", help="what the router serves, each route's versions and the promotion history")
    rollback = commands.add_parser("rollback", help="serve an earlier version of a route, or send its calls to the LLM")
    rollback.add_argument("route", help="a route name, e.g. cluster-2")
    rollback.add_argument("--to", help=f"a version (e.g. v0001) or '{promote.OFF}'; default: the version before the one served")
    args = parser.parse_args(argv)

    resource = pipeline_store_from_env(resolve=True)
    try:
        if args.command == "prepare-models":
            prepare_models(Path(resource.model_cache_dir), args.candidates)
            return 0
        if args.command == "run":
            return run(args.config, args.replay_calls)
        if args.command == "replay":
            print(replay_held_out_calls(resource.store(), args.calls))
            return 0
        # The other commands read (and rollback writes) the registry; on object storage through
        # the local copy, pulled first and pushed after a change. The folder is held to change
        # router.yaml or the local copy; reading local files written by renames needs no hold.
        mirror = resource.mirror()
        held = args.command == "rollback" or mirror is not None
        with exclusive(resource.output_path(), f"slm-convert {args.command}", print) if held else nullcontext():
            if mirror:
                mirror.pull(print)
            registry = resource.store().registry
            if args.command == "routes":
                print(describe_routes(registry))
                return 0
            if args.command == "rollback":
                router = promote.rollback(registry, args.route, args.to)
                resource.publish()
                served = {r["name"]: r["version"] for r in router["routes"]}
                print(f"{args.route} now serves {served.get(args.route, 'nothing (its calls go to the LLM)')}; "
                      f"router.yaml version {router['version']}")
                return 0
            print(format_summary(latest_summary(resource.store())))
            return 0
    except (FileNotFoundError, ValueError, models.ModelUnavailable, RuntimeError, sources.UnreadableLandingFile) as err:
        print(f"slm-convert: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
