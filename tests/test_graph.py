"""The whole asset graph through Dagster: materialization, checks, rerun, registry versions."""

import json
import shutil

import dagster as dg
import pytest
import yaml

from assets import cli, data, promotion, sensors
from assets.definitions import all_assets, all_checks, defs
from assets.resources import JudgeEndpoint, PipelineStore, RawZoneKeys
from pipeline import curate, evaluate, ingest, rawzone
from pipeline.store import LOCK_HOLDER, read_table, write_table
from tests import score_run
from tests.conftest import LANDING, REPO, postgres_dagster_home
from tests.hostile_records import calls_that_pass_collection, good_records, hostile_lines
from tests.test_webserver import start_webserver

DAY = "2026-10-01"  # the day of the one-day landing folder: runs are filed under a call day
ASSET_NAMES = {"raw_traces", "curated_traces", "task_clusters", "slm_candidates", "finetuned_adapters", "shadow_eval",
               "promotion_decisions", "router_config"}

# Tiny settings: the point here is the wiring, not the quality of a one-step adapter. Generative
# specialists only (tests/test_encoders.py runs the graph with encoder specialists).
QUICK = {
    "ops": {
        "slm_candidates": {"config": {"probe_calls": 1, "probe_shots": 1, "probe_max_new_tokens": 8,
                                      "specialist_kinds": ["generative"]}},
        "finetuned_adapters": {"config": {"max_steps": 1, "batch_size": 1, "max_length": 384, "min_holdout": 8, "max_holdout": 8,
                                          "generative_curve_calls": 2, "generative_curve_max_new_tokens": 8}},
        "shadow_eval": {"config": {"max_calls_per_cluster": 8, "max_new_tokens_cap": 8, "quality_floor": 0.0,
                                   "arm_calls": 1, "latency_calls": 1}},
        "promotion_decisions": {"config": {"min_holdout": 4}},
    }
}


def _resources(landing, tmp_path, base_model_dir) -> dict:
    keys = rawzone.new_keys()
    return {
        "pipeline_store": PipelineStore(landing_dir=str(landing), output_dir=str(tmp_path / "out"), model_cache_dir=str(base_model_dir.parent)),
        "raw_zone_keys": RawZoneKeys(encryption_key=keys[rawzone.ENCRYPTION_KEY_ENV], pseudonym_key=keys[rawzone.PSEUDONYM_KEY_ENV]),
        "judge_endpoint": JudgeEndpoint(),  # off
    }


def test_definitions_load_with_every_stage_a_check_and_a_nightly_schedule():
    graph = defs.resolve_asset_graph()
    assert {k.path[-1] for k in graph.get_all_asset_keys()} == ASSET_NAMES
    checked = {c.asset_key.path[-1] for check in all_checks for c in check.check_specs}
    assert checked == ASSET_NAMES
    assert defs.resolve_schedule_def("nightly_conversion").cron_schedule == "0 2 * * *"
    assert defs.resolve_job_def("slm_conversion").partitions_def == data.daily_calls
    assert defs.resolve_sensor_def("new_landing_files").job_name == "trace_collection"


def _evaluate_sensor(resources: dict, cursor: str | None = None):
    # PipelineStore has setup and teardown (the run's lock on the output folder), so the
    # context opens its resources as a context manager; a sensor's evaluation takes no lock
    with dg.build_sensor_context(resources=resources, cursor=cursor) as context:
        return sensors.new_landing_files(context), context.cursor


def test_sensor_starts_collection_once_per_new_or_changed_landing_file(one_day_landing, tmp_path):
    resources = {"pipeline_store": PipelineStore(landing_dir=str(one_day_landing), output_dir=str(tmp_path), model_cache_dir=str(tmp_path))}
    first, cursor = _evaluate_sensor(resources)
    assert isinstance(first, dg.RunRequest) and first.partition_key == data.daily_calls.get_last_partition_key()
    assert list(json.loads(cursor)) == [str(one_day_landing / "traces-2026-10-01.jsonl")]

    quiet, _ = _evaluate_sensor(resources, cursor)
    assert isinstance(quiet, dg.SkipReason) and "no new or changed files among 1" in quiet.skip_message

    (one_day_landing / "batch_output.jsonl").write_text("{}\n")
    new, _ = _evaluate_sensor(resources, cursor)
    assert isinstance(new, dg.RunRequest) and new.run_key != first.run_key
    assert new.tags["slm-convert/changed_files"] == "1"

    gone, _ = _evaluate_sensor({"pipeline_store": PipelineStore(
        landing_dir=str(tmp_path / "missing"), output_dir=str(tmp_path), model_cache_dir=str(tmp_path))})
    assert isinstance(gone, dg.SkipReason) and "does not exist" in gone.skip_message
    assert not (tmp_path / LOCK_HOLDER).exists()  # the sensor never took the output folder


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory, base_model_dir, postgres_env) -> dict:
    """The whole graph materialized once on a day of logs, with the Dagster instance on a real
    PostgreSQL server (configs/dagster-postgres.yaml), which a webserver shows afterwards."""
    root = tmp_path_factory.mktemp("graph")
    landing = root / "landing"
    landing.mkdir()
    shutil.copy(LANDING / f"traces-{DAY}.jsonl", landing)
    home = postgres_dagster_home(root / "dagster_home")
    resources = _resources(landing, root, base_model_dir)
    result = dg.materialize([*all_assets, *all_checks], resources=resources, run_config=QUICK, partition_key=DAY,
                            instance=dg.DagsterInstance.from_config(str(home)))
    return {"result": result, "resources": resources, "out": root / "out", "dagster_home": home}


@pytest.mark.slow
def test_whole_graph_materializes_on_a_day_of_logs_and_reruns_without_retraining(graph_run, monkeypatch):
    resources, result, out = graph_run["resources"], graph_run["result"], graph_run["out"]
    assert result.success
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert materialized == ASSET_NAMES
    checks = result.get_asset_check_evaluations()
    assert len(checks) == len(all_checks) and all(c.passed for c in checks)
    # the run, its materializations and check results are in PostgreSQL, where the webserver,
    # the daemon and every stage's job of a deployment read them
    instance = dg.DagsterInstance.from_config(str(graph_run["dagster_home"]))
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
    for name in ASSET_NAMES:
        assert instance.get_latest_materialization_event(dg.AssetKey(name)) is not None, name

    registry = out / "registry"
    assert (registry / "runs" / "LATEST").read_text().strip() == "0001"
    summary = json.loads((registry / "runs" / "0001" / "summary.json").read_text())
    router = yaml.safe_load((registry / "router.yaml").read_text())
    trained = [c for c in summary["clusters"] if c["selection"]["decision"] == "fine-tune"]
    assert len(trained) >= 2
    # with a quality floor of 0 every evaluated cluster is promoted: the promotion path runs
    assert len(router["routes"]) == len(trained) == summary["counts"]["promoted_routes"]
    for route in router["routes"]:
        assert route["version"] == "v0001" and (registry / route["adapter"] / "adapter_model.safetensors").is_file()
        assert 0 <= route["confidence_threshold"] <= 1 and -1 <= route["match"]["min_similarity"] <= 1
        assert json.loads((registry / route["name"] / "v0001" / "hashes.json").read_text())
    assert summary["serving"].startswith("vllm serve ") and f"{router['routes'][0]['name']}=" in summary["serving"]
    # all the run wrote is its owner's only: the registry's adapters too, though copied with their files' modes
    assert [str(p) for p in out.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o077] == []
    assert (out / "eval" / "coverage_quality.png").read_bytes().startswith(b"\x89PNG")
    assert 0 < summary["counts"]["share_of_calls_to_slms"] <= 1
    report = (registry / "runs" / "0001" / "report.md").read_text()
    assert all(f"| {c['name']} | {c['label']} |" in report for c in summary["clusters"])
    page = (registry / "runs" / "0001" / "report.html").read_text()
    assert page.count("<tr>") == len(summary["clusters"]) + 1 and 'src="coverage_quality.png"' in page
    for evaluation in (c["shadow_eval"] for c in trained):
        assert set(evaluation["arms"]) == {"calls", "base_zero_shot", "base_in_context", "fine_tuned"}
        assert evaluation["cost_and_speed"]["slm_latency_ms_batch_1"]["p50"] > 0
    for card in (out / "adapters").glob("*/adapter/README.md"):  # each adapter's model card, ours not PEFT's template
        assert "base_model: smollm2-135m-instruct" in card.read_text() and "More Information Needed" not in card.read_text()
    assert len(list((out / "adapters").glob("*/adapter/README.md"))) == len(trained)
    members = [i for c in summary["clusters"] for i in c["member_ids"]] + summary["unclustered_ids"]
    assert len(members) == len(set(members)) == summary["counts"]["curated_traces"]["curated"]
    assert summary["paths"]["router_config"] == str(registry / "router.yaml")
    # nothing written after scrubbing (tables, predictions, registry files) holds a canary
    # nor does any event the Dagster instance keeps (metadata: examples, removals, check results)
    scores = score_run.score(out, graph_run["dagster_home"])
    assert scores["canaries_left_after_scrubbing"] == scores["canaries_left_in_dagster_instance"] == 0

    # Same data and settings: a rerun promotes new versions of the routes but trains nothing again,
    # and probes and evaluates nothing again (no model is loaded: the kept results are the same).
    records = sorted((out / "adapters").glob("*/training.json"))
    # each generative adapter's learning curve: its snapshot after the one step answered held-out calls
    curves = [json.loads(p.read_text())["metrics"]["learning_curve"] for p in records]
    assert curves and all(len(c) == 1 and c[0]["step"] == 1 and 0 <= c[0]["score"] <= 1 for c in curves)
    assert not list((out / "adapters").glob("*/.adapter.snapshots"))  # removed once read
    stamps = [p.stat().st_mtime_ns for p in records]
    first_evaluation = json.loads((out / "eval" / "shadow_eval.json").read_text())
    monkeypatch.setattr(evaluate, "load_adapter_model", lambda *a, **k: pytest.fail("a model was loaded again"))
    assert dg.materialize([*all_assets, *all_checks], resources=resources, run_config=QUICK, partition_key=DAY).success
    monkeypatch.undo()
    assert [p.stat().st_mtime_ns for p in records] == stamps
    assert json.loads((out / "eval" / "shadow_eval.json").read_text()) == first_evaluation
    assert (registry / "runs" / "LATEST").read_text().strip() == "0002"
    assert {r["version"] for r in yaml.safe_load((registry / "router.yaml").read_text())["routes"]} == {"v0002"}

    # A serving limit below the adapters' rank fails a blocking check: router.yaml is not written.
    before = (registry / "router.yaml").read_bytes()
    strict = {"ops": {"promotion_decisions": {"config": {"min_holdout": 4, "max_lora_rank": 8}}}}
    gated_assets = [a for a in all_assets if a.key.path[-1] in ("promotion_decisions", "router_config")]
    gated = dg.materialize([*all_assets, *all_checks], resources=resources, run_config=strict, selection=gated_assets,
                           raise_on_error=False)
    failed = [c for c in gated.get_asset_check_evaluations() if not c.passed]
    assert [c.check_name for c in failed] == ["promoted_adapters_are_servable"]
    assert "LoRA rank 16 is above the serving limit 8" in json.dumps(failed[0].metadata["where"].value)
    assert {e.asset_key.path[-1] for e in gated.get_asset_materialization_events()} == {"promotion_decisions"}
    assert (registry / "router.yaml").read_bytes() == before

    # Decisions that the current evaluation does not support are refused (the check called directly)
    assert promotion.promoted_clusters_clear_the_floor(pipeline_store=resources["pipeline_store"]).passed
    evaluation_file = out / "eval" / "shadow_eval.json"
    evaluation = evaluation_file.read_text()
    evaluation_file.write_text(json.dumps({**json.loads(evaluation), "quality_floor": 0.99}))
    stale = promotion.promoted_clusters_clear_the_floor(pipeline_store=resources["pipeline_store"])
    evaluation_file.write_text(evaluation)
    assert not stale.passed and len(stale.metadata["where"].value) == len(trained)
    assert "What next: " in stale.description


@pytest.mark.slow
def test_calls_left_with_personal_data_are_set_aside_the_run_goes_on_and_the_check_guards_the_invariant(
        one_day_landing, tmp_path, base_model_dir):
    resources = _resources(one_day_landing, tmp_path, base_model_dir)
    result = dg.materialize(
        [data.raw_traces, data.curated_traces, data.task_clusters, data.no_known_pii_in_curated_traces],
        resources=resources,
        # scrub names only: the calls with e-mails, phone numbers, cards and keys are left to the sweep
        run_config={"ops": {"curated_traces": {"config": {"entities": ["PERSON"]}}}},
        partition_key=DAY,
    )
    assert result.success
    assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} >= {"curated_traces", "task_clusters"}
    store = resources["pipeline_store"].store()
    removed = read_table(store.table("curation_removed"))
    set_aside = removed[removed["reason"] == curate.POSSIBLE_PERSONAL_DATA]
    assert len(set_aside) > 0 and set_aside["where"].str.contains(": email address").any()
    metadata = next(e for e in result.get_asset_materialization_events()
                    if e.asset_key.path[-1] == "curated_traces").materialization.metadata
    assert metadata["possible_personal_data"].value == len(set_aside)

    # A curated table holding what the sweep flags (written by an older version, or edited) fails
    # the blocking check, which says what, where (call id and field, not the text) and what next.
    curated = read_table(store.table("curated_traces"))
    leaked = json.loads(curated.at[0, "messages"])
    leaked[-1]["content"] = "write to ada.lovelace77@gmail.com"
    curated.at[0, "messages"] = json.dumps(leaked)
    write_table(store.table("curated_traces"), curated)
    check = dg.materialize([data.curated_traces, data.no_known_pii_in_curated_traces], resources=resources,
                           selection=dg.AssetSelection.checks(data.no_known_pii_in_curated_traces), raise_on_error=False)
    assert not check.success
    reason = cli._failure_reason(check)
    assert reason.startswith("blocking check no_known_pii_in_curated_traces on curated_traces failed")
    assert f"{curated.at[0, 'trace_id']} (messages[{len(leaked) - 1}].content: email address)" in reason
    assert "What next: " in reason and "ada.lovelace77" not in reason


ARTIFACTS = REPO / "test-artifacts"  # screenshots kept by CI


def _metadata_entry(page, key: str):
    """The rendered markdown metadata entry `key` of the asset page's latest materialization:
    the table row itself, or the dialog that "[Show Markdown]" opens for longer entries."""
    row = page.locator("tr", has_text=key).first
    link = row.get_by_text("[Show Markdown]")
    if not link.count():
        return row
    link.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    return dialog


@pytest.mark.slow
def test_the_dagster_ui_shows_the_evaluation_with_its_plot_and_the_run_report(graph_run):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for this test; `make test` installs it (apt-get install chromium)"
    summary = json.loads((graph_run["out"] / "registry" / "runs" / "0001" / "summary.json").read_text())
    evaluated = [c["label"] for c in summary["clusters"] if c["shadow_eval"]]
    ARTIFACTS.mkdir(exist_ok=True)
    with start_webserver(graph_run["dagster_home"]) as port, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        # Dagster's "Join the community" dialog opens a second after each page load until it is
        # dismissed; clicking its Skip raced that delay and it once covered a metadata dialog.
        # Stored as its own Skip stores it, before any page runs, it never opens.
        page.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
        for asset, key, expected, plot in (
            ("shadow_eval", "scores", ["calibration / test calls", *evaluated], False),
            ("shadow_eval", "arms", ["base SLM in-context", "fine-tuned"], False),
            ("shadow_eval", "coverage_quality", [], True),
            ("router_config", "report", ["traffic share", *[c["name"] for c in summary["clusters"]]], True),
        ):
            page.goto(f"http://127.0.0.1:{port}/assets/{asset}")
            page.wait_for_load_state("networkidle")
            entry = _metadata_entry(page, key)
            for text in expected:  # waits until the entry's markdown has rendered
                expect(entry).to_contain_text(text, timeout=30_000)
            if plot:  # drawn, not only named
                image = entry.locator('img[src^="data:image/png;base64"]').first
                image.wait_for()
                assert image.evaluate("i => i.complete && i.naturalWidth") >= 600
            page.wait_for_timeout(500)  # the dialog fades in
            page.screenshot(path=str(ARTIFACTS / f"dagster-ui-{asset}-{key}.png"))
        browser.close()


@pytest.mark.slow
def test_hostile_lines_among_a_days_calls_stop_neither_this_run_nor_the_next_and_cost_no_good_call(
        one_day_landing, tmp_path, base_model_dir):
    good = good_records(1)[0]
    with open(one_day_landing / "hostile.jsonl", "wb") as landed:
        landed.writelines(line + b"\n" for _, line in hostile_lines(good))
        landed.writelines(json.dumps(record).encode() + b"\n" for record in calls_that_pass_collection(good))
    resources = _resources(one_day_landing, tmp_path, base_model_dir)
    for run in ("first", "next"):
        result = dg.materialize([data.raw_traces, data.curated_traces, data.no_known_pii_in_curated_traces],
                                resources=resources, partition_key=DAY)
        assert result.success, run
    curated = set(read_table(resources["pipeline_store"].store().table("curated_traces"))["trace_id"])
    day_alone = curate.curate(ingest.read_calls([LANDING / f"traces-{DAY}.jsonl"]).traces).curated
    assert set(day_alone["trace_id"]) <= curated  # every call the day's logs alone give is curated
    assert {"hostile-huge-message", "hostile-content-object"} <= curated
