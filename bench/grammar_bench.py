"""Structured-decoding libraries compared on the sample's tool calls: the cost of a constraint.

    pip install --target .cache/grammar-libs --no-deps lm-format-enforcer==0.11.3 interegular \\
        outlines==1.3.3 outlines_core==0.2.14 genson diskcache      # the two compared with xgrammar
    python -m bench.grammar_bench --calls 20

For the latest `--calls` calls of the sample's tool-call step (its true step from
tests/fixtures/labels.json, read by the bench only), each library builds the constraint of the
JSON list of calls of that request's own tools (`structured._tool_schema`: names and arguments
valid under each tool's schema), then computes the allowed tokens at every position of the logged
answer's JSON (teacher forcing, SmolLM2's tokenizer): what a generation pays per call and per
token on top of the model. Reported per library: setup ms per call (p50, max), mask ms per token
(mean) and whether the logged answer was accepted whole. A library that is not installed is
reported as such, and so is each tool schema a library refuses. Appended to bench/results/grammar.jsonl with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench import results
from pipeline import ingest, models, structured
from pipeline.calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, baseline_answer

REPO = Path(__file__).resolve().parents[1]
LIBS = REPO / ".cache" / "grammar-libs"


def with_xgrammar(tokenizer, vocab_size: int):
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def setup(schema: dict):
        return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def step(matcher, token: int) -> bool:
        matcher.fill_next_token_bitmask(bitmask)
        return matcher.accept_token(token)

    return setup, step


def with_lm_format_enforcer(tokenizer, vocab_size: int):
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

    data = build_token_enforcer_tokenizer_data(tokenizer)

    def setup(schema: dict):
        return {"enforcer": TokenEnforcer(data, JsonSchemaParser(schema)), "tokens": []}

    def step(state, token: int) -> bool:
        allowed = state["enforcer"].get_allowed_tokens(state["tokens"])
        state["tokens"].append(token)
        return token in allowed

    return setup, step


def with_outlines(tokenizer, vocab_size: int):
    from outlines.backends.outlines_core import OutlinesCoreBackend
    from outlines.models.transformers import TransformerTokenizer
    from outlines_core import Guide, Index
    from outlines_core.json_schema import build_regex_from_schema

    adapted = TransformerTokenizer(tokenizer)  # outlines' own reading of a transformers vocabulary
    vocabulary = OutlinesCoreBackend.create_outlines_core_vocabulary(
        adapted.vocabulary, adapted.eos_token_id, adapted.eos_token, adapted.convert_token_to_string)

    def setup(schema: dict):
        return Guide(Index(build_regex_from_schema(json.dumps(schema)), vocabulary))

    def step(guide, token: int) -> bool:
        allowed = guide.get_tokens()
        if token not in allowed:
            return False
        guide.advance(token)
        return True

    return setup, step


LIBRARIES = {"xgrammar": with_xgrammar, "lm-format-enforcer": with_lm_format_enforcer, "outlines-core": with_outlines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    args = parser.parse_args()
    sys.path.append(str(LIBS))

    from transformers import AutoTokenizer

    labels = json.loads((REPO / "tests" / "fixtures" / "labels.json").read_text())["records"]
    calls = ingest.read_calls(ingest.find_landing_files(REPO / "data" / "landing")).traces.sort_values("called_at")
    calls = calls[[labels.get(t, {}).get("step") == "call_tool" for t in calls["trace_id"]]]
    answers = [baseline_answer(r) for r in calls["response_message"]]
    work = [(structured._tool_schema(json.loads(t)), a[len(TOOL_CALL_OPEN):-len(TOOL_CALL_CLOSE)])
            for t, a in zip(calls["tools"], answers) if a.startswith(TOOL_CALL_OPEN)][-args.calls:]
    bundled = next(c for c in models.load_candidates(REPO / "configs" / "candidates.yaml") if c.source == "bundled-gguf")
    model_dir = models.resolve_model_dir(bundled, REPO / ".cache" / "models")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = len(tokenizer)
    measured = {}
    for name in args.libraries.split(","):
        try:
            setup, step = LIBRARIES[name](tokenizer, vocab_size)
        except ImportError as err:  # not installed, or not importable beside this transformers
            measured[name] = {"cannot be used": f"{type(err).__name__}: {err}"}
            print(name, measured[name], flush=True)
            continue
        setups, per_token, accepted, refused = [], [], 0, []
        for schema, answer in work:
            started = time.perf_counter()
            try:
                state = setup(schema)
            except Exception as err:  # noqa: BLE001 - a tool schema the library cannot take is counted
                refused.append(f"{type(err).__name__}: {str(err)[:120]}")
                continue
            setups.append(time.perf_counter() - started)
            tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
            started = time.perf_counter()
            ok = all(step(state, token) for token in tokens)
            per_token.append((time.perf_counter() - started) / len(tokens))
            accepted += ok
        measured[name] = {"setup_ms_p50": round(1000 * float(np.median(setups)), 2),
                          "setup_ms_max": round(1000 * max(setups), 2),
                          "mask_ms_per_token": round(1000 * float(np.mean(per_token)), 3),
                          "logged_answers_accepted": f"{accepted}/{len(work)}",
                          "schemas_refused": len(refused), "first_refusal": refused[0] if refused else None}
        print(name, measured[name], flush=True)
    results.record("grammar", {"calls": len(work), "tokenizer": bundled.name, "libraries": measured})


if __name__ == "__main__":
    main()
