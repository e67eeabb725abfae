"""Steps 1-3 as assets: raw_traces -> curated_traces -> task_clusters."""

import base64
import os
import warnings
from typing import Literal

import dagster as dg
from pydantic import Field

from assets.metadata import check_result, markdown_table
from assets.resources import PipelineStore, RawZoneKeys
from pipeline import cluster, curate, dedup, ingest, rawzone, sources
from pipeline.store import read_json, read_table, write_bytes, write_json, write_table

GROUP = "traces"


class IngestConfig(dg.Config):
    max_quarantined_share: float = Field(0.05, ge=0, le=1)  # the check fails above this share of a run's calls and lines
    encrypt_raw: bool = True  # false stores raw tables unencrypted (never for real user data)
    pseudonymize_origins: bool = True  # false keeps origin fields as logged
    origin_fields: list[str] = list(ingest.DEFAULT_ORIGIN_FIELDS)  # metadata fields that say who called
    step_tag_fields: list[str] = list(ingest.DEFAULT_STEP_TAG_FIELDS)  # metadata fields that name the agent's step
    formats: dict[str, str] = {}  # file glob -> format name, for files auto-detection gets wrong
    max_record_bytes: int = Field(sources.DEFAULT_MAX_RECORD_BYTES, ge=1024)  # a longer line is quarantined
    raw_retention_days: int = Field(30, ge=0)  # raw parts are deleted this long after ingestion; 0 keeps them


def _required_key(value: str, enabled: bool, env_var: str, setting: str) -> str | None:
    """The key when the feature is on; a clear refusal when it is on but no key is set."""
    if not enabled:
        return None
    if not value:
        raise dg.Failure(
            description=(
                f"{env_var} is not set, so raw traces cannot be stored safely. Set it (`make setup` writes "
                f"demo keys to .cache/keys.env; `python -m pipeline.rawzone new-keys` prints a pair), "
                f"or set `{setting}: false` in the raw_traces config to store them without it."
            )
        )
    return value


# Calls are partitioned by the day they were made. Collection is incremental by file, so any run
# takes in every new landing file, whichever day it is launched for, and each call lands in its
# own day; the days a run filled are reported as materializations of their partitions.
daily_calls = dg.DailyPartitionsDefinition(
    start_date=os.environ.get("SLM_FIRST_CALL_DAY", "2025-01-01"), end_offset=1, timezone="UTC"
)
# One run fills every day its files hold (a single-run backfill policy). Dagster still marks that
# parameter beta and would warn on every load of the definitions (each CLI command, the UI, the
# tests) with nothing for a user to do about it.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)


@dg.asset(group_name=GROUP, kinds={"parquet"}, partitions_def=daily_calls, backfill_policy=dg.BackfillPolicy.single_run())
def raw_traces(
    context: dg.AssetExecutionContext, config: IngestConfig, pipeline_store: PipelineStore, raw_zone_keys: RawZoneKeys
) -> dg.MaterializeResult:
    """Every LLM call of the landing folder, in any supported log format, in one canonical table
    partitioned by call day; malformed input goes to a quarantine table with its file, line and
    reason. Raw zone: encrypted at rest, origin fields replaced by keyed pseudonyms, deleted after
    the retention period."""
    encryption_key = _required_key(raw_zone_keys.encryption_key, config.encrypt_raw, rawzone.ENCRYPTION_KEY_ENV, "encrypt_raw")
    pseudonym_key = _required_key(raw_zone_keys.pseudonym_key, config.pseudonymize_origins, rawzone.PSEUDONYM_KEY_ENV, "pseudonymize_origins")
    store = pipeline_store.store()
    options = ingest.IngestOptions(
        formats=dict(config.formats),
        origin_fields=tuple(config.origin_fields),
        step_tag_fields=tuple(config.step_tag_fields),
        pseudonym_key=pseudonym_key,
        max_record_bytes=config.max_record_bytes,
    )
    try:
        result = ingest.collect(
            pipeline_store.landing(), store.raw, options, encryption_key, config.raw_retention_days, progress=context.log.info
        )
    # a format the config names that does not exist; a landing file that cannot be opened
    except (ValueError, sources.UnreadableLandingFile) as err:
        raise dg.Failure(description=str(err)) from err
    stats = result.stats
    if not result.days_stored:
        raise dg.Failure(
            description=(
                f"No usable LLM call in {stats.files_read} file(s) of {pipeline_store.landing()}: "
                f"{stats.quarantined} lines or files quarantined ({dict(stats.reasons)}); see {store.raw / rawzone.QUARANTINE}"
            )
        )
    summary = {
        **stats.as_dict(),
        "run_id": result.run_id,
        "max_quarantined_share": config.max_quarantined_share,
        "expired_raw_parts": result.expired_parts,
        "calls_ingested_by_day": result.days_stored,
    }
    write_json(store.stats("raw_traces"), summary)
    valid_days = set(daily_calls.get_partition_keys())
    for day, calls in sorted(stats.calls_by_day.items()):
        if day in valid_days and day not in context.partition_keys:
            context.log_event(dg.AssetMaterialization(asset_key=context.asset_key, partition=day, metadata={"calls": calls}))
    pipeline_store.publish(context.log.info)
    return dg.MaterializeResult(
        metadata={
            "calls": stats.calls,
            "quarantined": stats.quarantined,
            "repeated_records": stats.repeated,
            "files_read": stats.files_read,
            "files_unchanged": stats.files_unchanged,
            "formats": dg.MetadataValue.json(dict(stats.formats)),
            "skipped_not_llm_calls": dg.MetadataValue.json(dict(stats.skipped)),
            "quarantine_reasons": dg.MetadataValue.json(dict(stats.reasons)),
            "calls_by_day": dg.MetadataValue.json(dict(sorted(stats.calls_by_day.items()))),
            "expired_raw_parts": result.expired_parts,
            "encrypted": encryption_key is not None,
            "origins_pseudonymized": pseudonym_key is not None,
            "path": dg.MetadataValue.path(str(store.raw)),
        }
    )


@dg.asset_check(asset=raw_traces, description="The share of quarantined lines stays under the configured limit.")
def quarantined_share_below_limit(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    stats = read_json(pipeline_store.store().stats("raw_traces"))
    return dg.AssetCheckResult(
        passed=stats["quarantined_share"] <= stats["max_quarantined_share"],
        metadata={"quarantined_share": stats["quarantined_share"], "limit": stats["max_quarantined_share"]},
    )


class CurationConfig(dg.Config):
    entities: list[str] = list(curate.DEFAULT_ENTITIES)  # Presidio entity types to scrub
    score_threshold: float = Field(0.4, ge=0, le=1)  # Presidio's confidence score
    near_duplicate_threshold: float = Field(dedup.NEAR_THRESHOLD, gt=0, le=1)  # Jaccard similarity of word 3-grams
    # keep what was found in each text (types and positions, keyed by a keyed hash, no text) so
    # that nightly reruns analyze only new texts; needs SLM_PSEUDONYM_KEY for the hash
    reuse_findings: bool = True


@dg.asset(group_name=GROUP, deps=[raw_traces], kinds={"parquet", "presidio"})
def curated_traces(
    context: dg.AssetExecutionContext, config: CurationConfig, pipeline_store: PipelineStore, raw_zone_keys: RawZoneKeys
) -> dg.MaterializeResult:
    """Calls with personal data and secrets replaced by placeholders numbered per call, exact and
    near duplicates and calls without a usable answer removed (each removal recorded with its
    reason and, for duplicates, the call kept), calls in which the leak sweep still finds what
    looks like personal data set aside (with the fields concerned), calls with negative feedback
    marked not trainable. From here on nothing is raw: downstream stages read only this table."""
    store = pipeline_store.store()
    raw = ingest.stored_traces(store.raw, raw_zone_keys.encryption_key or None)
    cache = None
    if config.reuse_findings and raw_zone_keys.pseudonym_key:
        settings = curate.scrubbing_settings(tuple(config.entities), config.score_threshold)
        cache = curate.FindingsCache(store.tables / "scrub_findings.sqlite", raw_zone_keys.pseudonym_key, settings)
    result = curate.curate(
        raw, tuple(config.entities), config.score_threshold, config.near_duplicate_threshold, progress=context.log.info, cache=cache
    )
    write_table(store.table("curated_traces"), result.curated)
    write_table(store.table("curation_removed"), result.removed)
    counts = {"raw": len(raw), **result.counts(), "texts_reused_from_earlier_runs": result.reused_texts}
    set_aside = result.removed[result.removed["reason"] == curate.POSSIBLE_PERSONAL_DATA]
    removal_reasons = result.removal_reasons()
    write_json(store.stats("curated_traces"), {**counts, "removal_reasons": removal_reasons, "pii_findings": result.findings})
    pipeline_store.publish(context.log.info)
    return dg.MaterializeResult(
        metadata={
            **counts,
            "removal_reasons": dg.MetadataValue.json(removal_reasons),
            "pii_replaced": dg.MetadataValue.json(result.findings),
            # call ids and fields, never the text: enough to look the calls up in the raw zone
            "set_aside_possible_personal_data": dg.MetadataValue.json(dict(zip(set_aside["trace_id"], set_aside["where"]))),
            "path": dg.MetadataValue.path(str(store.table("curated_traces"))),
        }
    )


@dg.asset_check(
    asset=curated_traces,
    blocking=True,
    description="No curated call holds what the leak sweep flags (an e-mail address, card number, US phone number, API key, "
                "token, private key or password pattern): curation sets such calls aside, and this guards that it did.",
)
def no_known_pii_in_curated_traces(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    curated = read_table(pipeline_store.store().table("curated_traces"))
    return check_result(
        curate.sweep_leaks(curated),
        what="curated calls that still match a personal-data or secret pattern",
        next_step="curation sets such calls aside, so the curated table predates this version or was changed after it "
                  "was written: materialize curated_traces again (`slm-convert run` does); if the check fails again, "
                  "report these call ids and fields.",
        curated_calls=len(curated),
    )


class ClusteringConfig(dg.Config):
    embedding_model: str = cluster.BUNDLED_EMBEDDER  # or any sentence-transformers id or path
    signature: Literal[tuple(cluster.SIGNATURES)] = cluster.DEFAULT_SIGNATURE  # what text stands for a call's task (cluster.SIGNATURES)
    reduced_dimensions: int = Field(cluster.REDUCED_DIMENSIONS, ge=0)  # PCA before HDBSCAN; 0 keeps all
    max_fit_calls: int = Field(cluster.MAX_FIT_CALLS, ge=100)  # HDBSCAN's sample; the other calls join by centroid
    min_cluster_size: int = Field(0, ge=0)  # 0: 1% of the fitted calls, at least 15
    min_samples: int = Field(0, ge=0)  # 0: HDBSCAN's default (min_cluster_size)
    attach_noise: bool = True  # noise calls near a cluster's edge join it; the others stay on the LLM
    noise_tolerance: float = Field(cluster.NOISE_TOLERANCE, ge=0)  # how far outside a cluster's edge, in its own spreads
    use_step_tags: bool = True  # where calls carry the agent's own step tag, the tags make the clusters


@dg.asset(group_name=GROUP, deps=[curated_traces], kinds={"parquet", "hdbscan"})
def task_clusters(context: dg.AssetExecutionContext, config: ClusteringConfig, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """Each call's task type: embeddings of what it asks, grouped by HDBSCAN, with a readable
    label, answer statistics and example calls per cluster, a 2-D map and a report file
    (`store/task_clusters.md`). Cluster ids are stable across runs (matched by centroid; new,
    returned and vanished clusters are reported). Calls in no cluster stay on the LLM."""
    store = pipeline_store.store()
    curated = read_table(store.table("curated_traces"))
    context.log.info(f"embedding and clustering {len(curated)} calls")
    # every cluster id ever used, with its last centroid: a step keeps its id night after night
    known_path = store.stats("cluster_identities")
    result = cluster.cluster_calls(
        curated,
        model_name=config.embedding_model,
        min_cluster_size=config.min_cluster_size or None,
        min_samples=config.min_samples or None,
        noise_tolerance=config.noise_tolerance if config.attach_noise else None,
        known_clusters=read_json(known_path) if known_path.exists() else None,
        use_step_tags=config.use_step_tags,
        signature=config.signature,
        reduced_dimensions=config.reduced_dimensions or None,
        max_fit_calls=config.max_fit_calls,
        progress=context.log.info,
    )
    write_json(known_path, result.known_clusters)
    if result.identity["new"] or result.identity["vanished"]:
        context.log.info(f"clusters new: {result.identity['new']}, vanished: {result.identity['vanished']}")
    write_table(store.table("task_clusters"), result.assignments)
    write_json(store.stats("task_clusters"), result.clusters)
    map_path = store.tables / "task_clusters_map.png"
    write_bytes(map_path, result.map_png)
    report_path = store.tables / "task_clusters.md"
    write_bytes(report_path, cluster.cluster_report(result, map_path.name).encode())
    pipeline_store.publish(context.log.info)
    return dg.MaterializeResult(
        metadata={
            "clusters": len(result.clusters),
            "unclustered_share": round(result.unclustered_share, 4),
            "attached_from_noise": int(result.assignments["attached_from_noise"].sum()),
            "fitted_calls": result.fitted_calls,
            "cluster_identity": dg.MetadataValue.json(result.identity),
            "cluster_table": markdown_table(
                ["id", "label", "calls", "share", "answers", "distinct answers"],
                [
                    [c["cluster_id"], c["label"], c["size"], f"{c['share']:.1%}", c["outputs"]["answer_shape"], f"{c['outputs']['distinct_answer_share']:.0%}"]
                    for c in result.clusters
                ],
            ),
            # the UI renders Markdown images; a data URI keeps the map inside the event
            "cluster_map": dg.MetadataValue.md(f"![clusters](data:image/png;base64,{base64.b64encode(result.map_png).decode()})"),
            "report": dg.MetadataValue.path(str(report_path)),
            "examples": dg.MetadataValue.json({c["cluster_id"]: c["examples"] for c in result.clusters}),
            "outputs": dg.MetadataValue.json({c["cluster_id"]: c["outputs"] for c in result.clusters}),
            **({"step_tags": dg.MetadataValue.json(result.tag_report)} if result.tag_report else {}),
        }
    )


@dg.asset_check(asset=task_clusters, description="Clustering found at least one task type.")
def at_least_one_cluster(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    clusters = read_json(pipeline_store.store().stats("task_clusters"))
    return dg.AssetCheckResult(passed=len(clusters) > 0, metadata={"clusters": len(clusters)})
