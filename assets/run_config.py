"""Run configs checked before anything runs: every problem named by its key's path.

Dagster's own schema catches unknown keys and wrong types; each stage's `Config` class (pydantic)
then catches values out of range. `slm-convert run --config F` refuses a config with any problem
and lists them all, so a typo in a nightly config costs seconds, not a failed run hours in.
"""

import difflib
import re
from pathlib import Path

import dagster as dg
import yaml
from pydantic import ValidationError


# how Dagster's messages name a path ("at path root:ops:x:config"); our lines lead with it instead
DAGSTER_PATH = re.compile(r" at path root:[\w:]*")


class RunConfigError(ValueError):
    """A run config that cannot be used; the message lists every problem with its key's path."""


def load_run_config(path: Path) -> dict:
    """A run config file as a dict; a missing file or broken YAML is a RunConfigError."""
    if not path.is_file():
        raise RunConfigError(f"run config {path} does not exist")
    try:
        with open(path) as f:  # a YAML error then names the file, line and column
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RunConfigError(f"run config {path} is not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise RunConfigError(f"run config {path}: expected a mapping (ops: <asset>: config: ...), got {type(loaded).__name__}")
    return loaded


def problems(job: dg.JobDefinition, run_config: dict, stage_configs: dict[str, type[dg.Config]]) -> list[str]:
    """Every problem of `run_config` for `job`, as 'path: what is wrong' lines; empty when valid."""
    found = []
    try:
        dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as err:
        found = [line for e in err.errors for line in _schema_problems(e, stage_configs)]
    # value ranges, from each stage's Config class (one line per key at most)
    reported = {line.split(": ", 1)[0] for line in found}
    for stage, section in (run_config.get("ops") or {}).items() if isinstance(run_config.get("ops"), dict) else []:
        values = section.get("config") if isinstance(section, dict) else None
        if stage not in stage_configs or not isinstance(values, dict):
            continue
        try:
            stage_configs[stage](**values)
        except ValidationError as err:
            for error in err.errors():
                path = ".".join(["ops", stage, "config", *map(str, error["loc"])])
                if path not in reported and error["type"] != "extra_forbidden":  # those are reported already
                    found.append(f"{path}: {error['msg']} (got {error.get('input')!r})")
    return found


def check(job: dg.JobDefinition, run_config: dict, stage_configs: dict[str, type[dg.Config]], source: str) -> None:
    """Raise a RunConfigError listing every problem of `run_config`."""
    found = problems(job, run_config, stage_configs)
    if found:
        lines = "\n".join(f"  {p}" for p in found)
        raise RunConfigError(f"run config {source} has {len(found)} problem(s):\n{lines}")


def _schema_problems(error, stage_configs: dict[str, type[dg.Config]]) -> list[str]:
    levels = list(error.stack.levels)
    dotted = ".".join(levels) or "(top level)"
    data = error.error_data
    keys = [data.field_name] if hasattr(data, "field_name") else list(getattr(data, "field_names", []))
    if error.reason.name in ("MISSING_REQUIRED_FIELD", "MISSING_REQUIRED_FIELDS"):
        return [f"{dotted}: missing key {key!r}" for key in keys]
    if error.reason.name not in ("FIELD_NOT_DEFINED", "FIELDS_NOT_DEFINED"):
        # Dagster's message names the path as root:a:b; it leads the line already
        return [f"{dotted}: {DAGSTER_PATH.sub('', error.message)}"]
    known = _known_keys(levels, stage_configs)
    lines = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (f" (known: {', '.join(sorted(known))})" if known else "")
        lines.append(f"{dotted}: unknown key {key!r}{hint}")
    return lines


def _known_keys(path: list[str], stage_configs: dict[str, type[dg.Config]]) -> list[str]:
    if path == ["ops"]:
        return list(stage_configs)
    if len(path) == 3 and path[0] == "ops" and path[2] == "config" and path[1] in stage_configs:
        return list(stage_configs[path[1]].model_fields)
    return []
