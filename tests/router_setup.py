"""A registry with a promoted route of one step of the sample, for the router's tests and its
benchmark: a real PEFT adapter of the bundled base model (freshly initialized, so it answers as
the base model does) and the match rule clustering would give the step's calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cluster, promote


def untrained_adapter(base_model_dir: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(folder)
    return folder


def step_route(calls: pd.DataFrame, name: str, base_model_dir: Path, adapter_dir: Path, threshold: float) -> dict:
    """A route for the task of `calls`: their centroid and admission similarity, as clustering computes them."""
    vectors = cluster.embed_signatures(list(calls["messages"]), list(calls["tools"])).per_call()
    centroid = vectors.mean(axis=0)
    similarity = vectors @ (centroid / np.linalg.norm(centroid))
    return {"name": name, "label": name, "base_model": "smollm2-135m-instruct",
            "base_model_path": str(base_model_dir), "adapter_dir": str(adapter_dir), "threshold": threshold,
            "centroid": [float(x) for x in centroid],
            "min_similarity": cluster.admission_similarity(similarity, np.ones(len(similarity))),
            "match_embedding": {"model": cluster.BUNDLED_EMBEDDER, "signature": cluster.DEFAULT_SIGNATURE},
            "training": {}, "run": "0001"}


def promoted_registry(folder: Path, routes: list[dict], fallback_url: str, max_new_tokens: int,
                      api_key_env: str = "TEST_FALLBACK_KEY") -> Path:
    registry = folder / "registry"
    promote.promote_routes(registry, [(r, {"max_new_tokens": max_new_tokens}) for r in routes],
                           {"model": "gpt-4.1", "base_url": fallback_url, "api_key_env": api_key_env}, "0001")
    return registry
