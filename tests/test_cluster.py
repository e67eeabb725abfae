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
