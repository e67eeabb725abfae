import numpy as np
from sklearn.metrics import adjusted_rand_score

from pipeline import cluster


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
