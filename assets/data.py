"""Steps 1-3 as assets: raw_traces -> curated_traces -> task_clusters."""

import dagster as dg

from assets.metadata import markdown_table
from assets.resources import PipelineStore, RawZoneKeys
from pipeline import cluster, curate, ingest, rawzone
from pipeline.store import read_json, read_table, write_json, write_table

GROUP = "traces"


class IngestConfig(dg.Config):
    max_quarantined_share: float = 0.05  # the check fails above this share of lines
    encrypt_raw: bool = True  # false stores raw tables unencrypted (never for real user data)
    pseudonymize_origins: bool = True  # false keeps session ids as logged


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


@dg.asset(group_name=GROUP, kinds={"parquet"})
def raw_traces(
    context: dg.AssetExecutionContext, config: IngestConfig, pipeline_store: PipelineStore, raw_zone_keys: RawZoneKeys
) -> dg.MaterializeResult:
    """Every logged LLM call of the landing folder in one canonical table; malformed lines go
    to a quarantine table with their file, line and reason. Both are raw zone: encrypted at rest,
    with session ids replaced by keyed pseudonyms."""
    encryption_key = _required_key(raw_zone_keys.encryption_key, config.encrypt_raw, rawzone.ENCRYPTION_KEY_ENV, "encrypt_raw")
    pseudonym_key = _required_key(raw_zone_keys.pseudonym_key, config.pseudonymize_origins, rawzone.PSEUDONYM_KEY_ENV, "pseudonymize_origins")
    store = pipeline_store.store()
    files = ingest.find_log_files(pipeline_store.landing())
    context.log.info(f"reading {len(files)} log files from {pipeline_store.landing()}")
    result = ingest.ingest(files)
    quarantine_file = rawzone.write_raw_table(store.table("quarantine"), result.quarantine, ingest.QUARANTINE_SCHEMA, encryption_key)
    if result.traces.empty:
        raise dg.Failure(
            description=(
                f"No usable LLM call in {len(files)} file(s) of {pipeline_store.landing()}: all "
                f"{len(result.quarantine)} lines were quarantined ({ingest.quarantine_reasons(result.quarantine)}); "
                f"see {quarantine_file}"
            )
        )
    traces = result.traces
    if pseudonym_key:
        traces = traces.assign(session_id=rawzone.pseudonymize(traces["session_id"], pseudonym_key))
    written = rawzone.write_raw_table(store.table("raw_traces"), traces, ingest.TRACE_SCHEMA, encryption_key)
    reasons = ingest.quarantine_reasons(result.quarantine)
    stats = {
        "files": len(files),
        "lines": result.lines_read,
        "calls": len(result.traces),
        "quarantined": len(result.quarantine),
        "repeated_records": result.repeated,
        "quarantined_share": round(len(result.quarantine) / max(result.lines_read, 1), 4),
        "max_quarantined_share": config.max_quarantined_share,
        "quarantine_reasons": reasons,
    }
    write_json(store.stats("raw_traces"), stats)
    return dg.MaterializeResult(
        metadata={
            "calls": len(result.traces),
            "quarantined": len(result.quarantine),
            "repeated_records": result.repeated,
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "files": len(files),
            "encrypted": encryption_key is not None,
            "origins_pseudonymized": pseudonym_key is not None,
            "path": dg.MetadataValue.path(str(written)),
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
    score_threshold: float = 0.4


@dg.asset(group_name=GROUP, deps=[raw_traces], kinds={"parquet", "presidio"})
def curated_traces(
    context: dg.AssetExecutionContext, config: CurationConfig, pipeline_store: PipelineStore, raw_zone_keys: RawZoneKeys
) -> dg.MaterializeResult:
    """Calls with personal data replaced by typed placeholders, exact duplicates and calls
    without a usable answer removed (each removal recorded with its reason). From here on
    nothing is raw: downstream stages read only this table."""
    store = pipeline_store.store()
    raw = rawzone.read_raw_table(store.table("raw_traces"), raw_zone_keys.encryption_key or None)
    result = curate.curate(raw, tuple(config.entities), config.score_threshold, progress=context.log.info)
    write_table(store.table("curated_traces"), result.curated)
    write_table(store.table("curation_removed"), result.removed)
    counts = {"raw": len(raw), **result.counts()}
    write_json(store.stats("curated_traces"), {**counts, "pii_findings": result.findings})
    return dg.MaterializeResult(
        metadata={
            **counts,
            "pii_replaced": dg.MetadataValue.json(result.findings),
            "path": dg.MetadataValue.path(str(store.table("curated_traces"))),
        }
    )


@dg.asset_check(
    asset=curated_traces,
    blocking=True,
    description="No e-mail, card number, US phone number or API key pattern survives scrubbing.",
)
def no_known_pii_in_curated_traces(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    curated = read_table(pipeline_store.store().table("curated_traces"))
    leaks = curate.find_leaks(list(curated["messages"]) + list(curated["response_message"]))
    return dg.AssetCheckResult(passed=sum(leaks.values()) == 0, metadata={"texts_with_leaks": dg.MetadataValue.json(leaks)})


class ClusteringConfig(dg.Config):
    embedding_model: str = cluster.BUNDLED_EMBEDDER  # or any sentence-transformers id or path
    min_cluster_size: int = 0  # 0: 1% of calls, at least 15
    min_samples: int = 0  # 0: HDBSCAN's default (min_cluster_size)


@dg.asset(group_name=GROUP, deps=[curated_traces], kinds={"parquet", "hdbscan"})
def task_clusters(context: dg.AssetExecutionContext, config: ClusteringConfig, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """Each call's task type: embeddings of what it asks, grouped by HDBSCAN, with a readable
    label and example calls per cluster. Calls in no cluster stay on the LLM."""
    store = pipeline_store.store()
    curated = read_table(store.table("curated_traces"))
    context.log.info(f"embedding and clustering {len(curated)} calls")
    result = cluster.cluster_calls(
        curated,
        model_name=config.embedding_model,
        min_cluster_size=config.min_cluster_size or None,
        min_samples=config.min_samples or None,
    )
    write_table(store.table("task_clusters"), result.assignments)
    write_json(store.stats("task_clusters"), result.clusters)
    return dg.MaterializeResult(
        metadata={
            "clusters": len(result.clusters),
            "unclustered_share": round(result.unclustered_share, 4),
            "cluster_table": markdown_table(
                ["id", "label", "calls", "share"],
                [[c["cluster_id"], c["label"], c["size"], f"{c['share']:.1%}"] for c in result.clusters],
            ),
            "examples": dg.MetadataValue.json({c["cluster_id"]: c["examples"] for c in result.clusters}),
        }
    )


@dg.asset_check(asset=task_clusters, description="Clustering found at least one task type.")
def at_least_one_cluster(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    clusters = read_json(pipeline_store.store().stats("task_clusters"))
    return dg.AssetCheckResult(passed=len(clusters) > 0, metadata={"clusters": len(clusters)})
