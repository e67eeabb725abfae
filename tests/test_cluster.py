import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline import cluster
from pipeline.calls import signature_parts
from tests.conftest import FORMATS


@pytest.fixture(scope="module", autouse=True)
def _embed_the_sample_once(sample_embeddings):
    with sample_embeddings:
        yield


def test_clusters_match_the_true_step_types(clustering, labels):
    truth = [labels["records"][i]["step"] for i in clustering.assignments["trace_id"]]
    assert adjusted_rand_score(truth, clustering.assignments["cluster_id"]) >= 0.9
    assert len(clustering.clusters) == 4
    assert clustering.unclustered_share < 0.05


def test_each_cluster_has_a_readable_label_and_representative_examples(clustering, labels):
    for summary in clustering.clusters:
        assert len(summary["label"].split()) == 4
        assert len(summary["examples"]) == 3
        steps = {labels["records"][e["trace_id"]]["step"] for e in summary["examples"]}
        assert len(steps) == 1  # the examples nearest the centroid are of one task
    labels_text = " ".join(c["label"] for c in clustering.clusters)
    assert "intent" in labels_text and "tool" in labels_text


def test_too_few_calls_are_left_unclustered():
    ids = cluster.assign_clusters(np.eye(5), min_cluster_size=15, min_samples=None)
    assert (ids == cluster.UNCLUSTERED).all()


def test_noise_close_to_a_cluster_joins_it_and_far_noise_stays_unclustered():
    rng = np.random.default_rng(0)

    def around(axis, n, spread):
        points = np.zeros((n, 8))
        points[:, axis] = 1.0
        points += rng.normal(0, spread, points.shape)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    embeddings = np.vstack([around(0, 40, 0.05), around(1, 40, 0.05), around(0, 1, 0.01), around(2, 1, 0.01)])
    ids = np.array([0] * 40 + [1] * 40 + [cluster.UNCLUSTERED] * 2)
    attached = cluster.attach_noise(embeddings, ids)
    assert attached[80] == 0  # as close to cluster 0 as its own members
    assert attached[81] == cluster.UNCLUSTERED  # near no cluster: stays on the LLM
    assert (attached[:80] == ids[:80]).all()


def test_noise_attachment_on_the_sample_takes_back_stragglers_and_never_another_step(clustering, labels):
    embeddings, ids = clustering.embeddings, clustering.assignments["cluster_id"].to_numpy()
    steps = np.array([labels["records"][i]["step"] for i in clustering.assignments["trace_id"]])
    # stragglers: the 10% of each cluster farthest from its centroid, made noise
    stragglers = ids.copy()
    for cluster_id in set(ids) - {cluster.UNCLUSTERED}:
        members = np.flatnonzero(ids == cluster_id)
        centroid = embeddings[members].mean(axis=0)
        stragglers[members[np.argsort(embeddings[members] @ centroid)[: len(members) // 10]]] = cluster.UNCLUSTERED
    taken_back = cluster.attach_noise(embeddings, stragglers)
    made_noise = (stragglers == cluster.UNCLUSTERED) & (ids != cluster.UNCLUSTERED)
    assert (taken_back[made_noise] == ids[made_noise]).mean() >= 0.9
    assert not ((taken_back != cluster.UNCLUSTERED) & (taken_back != ids)).any()  # never elsewhere
    # another step: the math calls made noise with their cluster gone, they join nothing
    math = steps == "solve_math"
    without_math = np.where(math, cluster.UNCLUSTERED, ids)
    assert (cluster.attach_noise(embeddings, without_math)[math] == cluster.UNCLUSTERED).all()


def test_cluster_ids_stay_stable_across_nightly_runs_on_different_days(curation, labels):
    curated = curation.curated
    day = curated["called_at"].dt.strftime("%Y-%m-%d")
    first = cluster.cluster_calls(curated[day <= "2026-10-03"])
    second = cluster.cluster_calls(curated[day >= "2026-10-05"], known_clusters=first.known_clusters)

    def step_of_cluster(result):
        steps = result.assignments["trace_id"].map(lambda i: labels["records"][i]["step"])
        return {c: steps[result.assignments["cluster_id"] == c].mode()[0] for c in set(result.assignments["cluster_id"]) - {-1}}

    assert step_of_cluster(first) == step_of_cluster(second)  # each step keeps its id
    assert second.identity == {"kept": [0, 1, 2, 3], "new": [], "returned": [], "vanished": []}

    # the math step is gone one night: its id is reported vanished, never given to another cluster
    math_id = next(c for c, step in step_of_cluster(second).items() if step == "solve_math")
    centroids = {c: second.embeddings[second.assignments["cluster_id"].to_numpy() == c].mean(axis=0) for c in range(4)}
    without = {c: v for c, v in centroids.items() if c != math_id}
    mapping, known, report = cluster.match_identities(without, second.known_clusters)
    assert mapping == {c: c for c in without} and report["vanished"] == [math_id]
    # it comes back the night after with its old id; a brand-new step gets an id never used
    new_step = np.zeros_like(centroids[0])
    new_step[0] = 1.0
    mapping, _, report = cluster.match_identities({**centroids, 9: new_step}, known)
    assert mapping[math_id] == math_id and report["returned"] == [math_id]
    assert mapping[9] == 4 and report["new"] == [4]


def test_each_cluster_reports_what_its_answers_look_like(clustering, labels):
    expected = {"classify_intent": "label_set", "solve_math": "final_number", "extract_slots": "json_object", "call_tool": "tool_call"}
    for summary in clustering.clusters:
        step = labels["records"][summary["examples"][0]["trace_id"]]["step"]
        outputs = summary["outputs"]
        assert outputs["answer_shape"] == expected[step]
        assert outputs["answers"] == summary["size"] and 0 < outputs["distinct_answer_share"] <= 1
        assert 0 < outputs["mean_answer_chars"] <= outputs["p95_answer_chars"]
    math = next(c for c in clustering.clusters if c["outputs"]["answer_shape"] == "final_number")
    intents = next(c for c in clustering.clusters if c["outputs"]["answer_shape"] == "label_set")
    assert math["outputs"]["mean_answer_chars"] > 5 * intents["outputs"]["mean_answer_chars"]
    assert intents["outputs"]["distinct_answer_share"] < math["outputs"]["distinct_answer_share"]


def test_the_map_is_a_png_and_the_report_names_every_cluster(clustering):
    assert clustering.map_png.startswith(b"\x89PNG\r\n\x1a\n") and len(clustering.map_png) > 10_000
    report = cluster.cluster_report(clustering, "map.png")
    assert "![2-D map of the clusters](map.png)" in report
    for summary in clustering.clusters:
        assert f"## Cluster {summary['cluster_id']}: {summary['label']}" in report
        assert all(example["trace_id"] in report for example in summary["examples"])


def test_fitting_on_a_sample_of_the_calls_finds_the_same_steps(curation, clustering, labels):
    # HDBSCAN sees 800 of the calls; all the others join their cluster by centroid
    sampled = cluster.cluster_calls(curation.curated, max_fit_calls=800)
    assert sampled.fitted_calls == 800
    assert adjusted_rand_score(clustering.assignments["cluster_id"], sampled.assignments["cluster_id"]) >= 0.95
    assert sampled.unclustered_share < 0.05
    assert sampled.assignments["attached_from_noise"].sum() >= len(curation.curated) - 800 - 50


def test_repeated_calls_are_embedded_once_and_an_unknown_signature_is_refused(curation):
    calls = curation.curated.iloc[:50]
    repeated = pd.concat([calls] * 3, ignore_index=True)
    embedded = cluster.embed_signatures(list(repeated["messages"]), list(repeated["tools"]))
    assert len(embedded.vectors) <= 50 and embedded.counts.sum() == 150
    assert np.allclose(np.linalg.norm(embedded.vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown task signature 'template'"):
        cluster.embed_signatures(list(calls["messages"]), list(calls["tools"]), signature="template")


def test_pca_keeps_the_main_directions_and_leaves_small_inputs_alone():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 64))
    assert cluster.reduce_dimensions(points, 8).shape == (200, 8)
    assert cluster.reduce_dimensions(points, None) is points
    few = points[:5]
    assert cluster.reduce_dimensions(few, 8) is few  # fewer points than dimensions asked: unchanged


def test_step_tags_from_the_agent_make_the_clusters_and_disagreements_are_reported(curation, labels):
    calls = curation.curated.reset_index(drop=True)
    steps = calls["trace_id"].map(lambda i: labels["records"][i]["step"])
    tags = steps.copy()
    mislabelled = steps.index[steps == "solve_math"][:30]  # the agent's instrumentation got these wrong
    tags[mislabelled] = "extract_slots"
    tags[steps.index[::10]] = None  # and some calls carry no tag
    result = cluster.cluster_calls(calls.assign(step_tag=tags))

    report = result.tag_report
    assert report["tags"] == 4 and report["untagged_calls"] == len(steps.index[::10])
    assert report["disagreeing_calls"] == len(set(mislabelled) - set(steps.index[::10]))
    assert set(report["disagreeing_examples"]) <= set(calls["trace_id"].iloc[mislabelled])
    # the math calls' embedding cluster carries two tags (27 of its 400 calls say extract_slots)
    assert {"solve_math", "extract_slots"} in [set(tags) for tags in report["embedding_clusters_joining_tags"].values()]
    assert report["agreement_ari"] < 1.0
    # the tags win for tagged calls; untagged calls take their embedding cluster's tag
    cluster_tag = {c["cluster_id"]: c["step_tag"] for c in result.clusters}
    final = result.assignments["cluster_id"].map(cluster_tag)
    assert (final[tags.notna()] == tags[tags.notna()]).all()
    assert (final[tags.isna()] == steps[tags.isna()]).mean() >= 0.99


def test_step_tags_are_read_from_the_configured_metadata_field(tmp_path):
    from pipeline import ingest

    record = json.loads((FORMATS / "openai_chat_multiturn.jsonl").read_text().splitlines()[0])
    record["metadata"] = {**record.get("metadata", {}), "Step_Type": "classify_intent", "phase": "triage"}
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "calls.jsonl").write_text(json.dumps(record) + "\n")
    files = ingest.find_landing_files(landing)
    assert ingest.read_calls(files).traces["step_tag"].tolist() == ["classify_intent"]
    custom = ingest.IngestOptions(step_tag_fields=("phase",))
    assert ingest.read_calls(files, custom).traces["step_tag"].tolist() == ["triage"]


# ---------------------------------------------------------------------------------------------
# Production-style prompts (tests/production_prompts.py): one long agent preamble before every
# step's instruction, filled-in variables, retrieved excerpts, conversation history, and two steps
# over the same messages with different label sets


def _production(ingested, labels, exclude=(), **options) -> pd.DataFrame:
    from tests.production_prompts import production_calls

    steps = {i: r["step"] for i, r in labels["records"].items() if i not in set(exclude)}
    return production_calls(ingested.traces, steps, **options)


@pytest.mark.parametrize("preamble_tokens", [300, 2000])
def test_steps_behind_a_long_shared_preamble_are_told_apart_and_each_step_stays_whole(ingested, labels, preamble_tokens):
    from tests.production_prompts import TRUE_STEP

    calls = _production(ingested, labels, per_step=60, preamble_tokens=preamble_tokens, history_share=0.3)
    result = cluster.cluster_calls(calls, use_step_tags=False)
    assert adjusted_rand_score(calls[TRUE_STEP], result.assignments["cluster_id"]) >= 0.9
    assert len(result.clusters) == 5  # the triage step is not the intent step, though it reads the same messages
    # what a signature reads of the instructions: the step's own, not the preamble or the filled-in values
    step_segments = frozenset(result.clusters[0]["match_embedding"]["step_segments"])
    intent = calls[calls[TRUE_STEP] == "classify_intent"].iloc[0]
    instructions = signature_parts(intent["messages"], intent["tools"], step_segments=step_segments)[0]
    assert instructions.startswith("List every intent expressed in the guest's message")
    assert "Section 1." not in instructions and "Today is" not in instructions and "Loyalty tier" not in instructions


def test_the_sample_has_no_preamble_shared_by_steps_so_signatures_read_whole_prompts(ingested, clustering):
    assert cluster.step_instruction_segments(list(ingested.traces["messages"]), 15) is None
    assert all("step_segments" not in c["match_embedding"] for c in clustering.clusters)


def test_the_router_places_new_production_style_calls_by_their_step_instruction(ingested, labels):
    from pipeline.router import EmbeddingCache, Route, RouteTable
    from tests.production_prompts import TRUE_STEP

    calls = _production(ingested, labels, per_step=60, preamble_tokens=1000)
    result = cluster.cluster_calls(calls, use_step_tags=False)
    step_of = calls.assign(cluster_id=result.assignments["cluster_id"]).groupby("cluster_id")[TRUE_STEP].agg(pd.Series.mode)
    routes = tuple(Route(name=step_of[c["cluster_id"]], version="v0001", label=c["label"],
                         centroid=np.asarray(c["centroid"], dtype=np.float32) / np.linalg.norm(c["centroid"]),
                         min_similarity=c["match_min_similarity"],
                         embedding_model=c["match_embedding"]["model"], signature=c["match_embedding"]["signature"],
                         base_model_path="unused", adapter_dir=Path("unused"), threshold=0.5, max_new_tokens=8,
                         step_segments=frozenset(c["match_embedding"]["step_segments"])) for c in result.clusters)
    table = RouteTable(1, routes, {})
    # calls never clustered: other messages, other dates, tiers, excerpts and histories
    new = _production(ingested, labels, exclude=set(calls["trace_id"]), per_step=8, preamble_tokens=1000, seed=7)
    embeddings = EmbeddingCache()
    matched = [table.match(m, t, embeddings) for m, t in zip(new["messages"], new["tools"])]
    assert [m.route.name if m.route else None for m in matched] == list(new[TRUE_STEP])
