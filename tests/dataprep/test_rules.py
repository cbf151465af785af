"""The single-concept checker against hand-labelled pairs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dataprep.promptfile import default_prompt_path
from dataprep.rules import RULES, Verdict, check, lemma

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rule_pairs.jsonl"
PAIRS = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_fixture_covers_every_rule_and_is_big_enough():
    assert len(PAIRS) >= 60
    seen = {v for p in PAIRS for v in p["violations"]}
    assert seen == set(RULES)
    assert sum(p["passed"] for p in PAIRS) >= 20


@pytest.mark.parametrize("pair", PAIRS, ids=[p["id"] for p in PAIRS])
def test_labelled_pair(pair):
    v = check(pair["source"], pair["target"])
    assert (v.passed, list(v.violations)) == (pair["passed"], pair["violations"])
    if pair["source_span"] is not None:
        assert (v.source_span, v.target_span) == (pair["source_span"], pair["target_span"])


@pytest.mark.parametrize("pair", PAIRS, ids=[p["id"] for p in PAIRS])
def test_spans_index_the_raw_texts(pair):
    v = check(pair["source"], pair["target"])
    assert len(v.source_spans) == len(v.target_spans)
    for (s0, s1), (t0, t1) in zip(v.source_spans, v.target_spans):
        assert 0 <= s0 <= s1 <= len(pair["source"])
        assert 0 <= t0 <= t1 <= len(pair["target"])
    if v.source_span and v.passed:
        # the reported phrase lies inside the first changed region
        s0, s1 = v.source_spans[0]
        t0, t1 = v.target_spans[0]
        assert v.source_span in pair["source"][s0:s1]
        assert v.target_span in pair["target"][t0:t1]


def test_pairs_shaped_like_the_published_ones_both_fail(editing_pairs):
    # like the two pairs published with the paper's code: a colour plus another concept changes
    pairs = json.loads(editing_pairs.read_text())
    first, second = (check(p["prompt"], p["tgt_prompt"]) for p in pairs)
    assert not first.passed and {"color_change", "multiple_concepts"} <= set(first.violations)
    assert (first.source_span, first.target_span) == ("white", "blue")
    assert not second.passed and {"color_change", "multiple_concepts"} <= set(second.violations)
    assert len(second.source_spans) >= 4  # green (twice), barrels (twice), nets (twice)


def test_paper_example_in_edit_txt_passes():
    text = default_prompt_path("edit.txt").read_text(encoding="utf-8")
    source = text.split("Input:", 1)[1].split("Output:", 1)[0].strip()
    target = text.split("Output:", 1)[1].strip()
    v = check(source, target)
    assert v.passed, v.reasons()
    assert (v.source_span, v.target_span) == ("dog", "fox")
    assert len(v.source_spans) == 5  # every mention of the dog, possessives included
    assert all(source[a:b].startswith("dog") for a, b in v.source_spans)


def test_violations_follow_rules_order_and_reasons_name_them():
    v = check("A dog and a cat sit together.", 'Output: "A fox and an owl sit together, on the"')
    order = list(RULES)
    assert list(v.violations) == sorted(v.violations, key=order.index)
    assert len(v.violations) >= 3
    assert [r.split(":", 1)[0] for r in v.reasons()] == list(v.violations)


def test_verdict_is_frozen():
    v = check("A dog.", "A fox.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.passed = False  # type: ignore[misc]
    assert isinstance(v, Verdict)


@pytest.mark.parametrize(
    "source,target",
    [(None, None), ("", "x"), ("x", None), ("🙂 🙂", "🙂"), ("a\u00a0dog", "a\u00a0fox"), ("...", "..."), ("A dog.", "A dog." * 500)],
)
def test_never_raises(source, target):
    v = check(source, target)
    assert isinstance(v.passed, bool)
    assert set(v.violations) <= set(RULES)


def test_insertion_and_deletion_spans_are_empty_on_the_other_side():
    v = check("A dog on the grass.", "A dog on the green grass.")
    assert v.violations == ("color_change", "added_content")
    ((s0, s1),), ((t0, t1),) = v.source_spans, v.target_spans
    assert s0 == s1 and "A dog on the green grass."[t0:t1] == "green"


@pytest.mark.parametrize(
    "word,expected",
    [("dogs", "dog"), ("dog's", "dog"), ("dog’s", "dog"), ("dogs'", "dog"), ("foxes", "fox"), ("puppies", "puppy"),
     ("glasses", "glass"), ("horses", "horse"), ("vases", "vase"), ("benches", "bench"), ("bus", "bus"), ("wolves", "wolf"), ("children", "child"), ("grass", "grass")],
)
def test_lemma_folds_plural_and_possessive(word, expected):
    assert lemma(word) == expected


@pytest.mark.parametrize(
    "source,target",
    [
        ("A dog sits on a sofa.", "A cat stands on a sofa."),  # noun + verb in one diff region
        ("A dog sits on a red sofa in a living room.", "A cat sleeps on a red sofa in a living room."),
        ("Two dogs play in the snow.", "Three cats play in the snow."),  # number + noun
        ("A dog in a park.", "A fox of a park."),  # noun + preposition
        ("A dog sits on the grass.", "Two foxes sit on the grass."),  # a -> two is a count change too
    ],
)
def test_two_adjacent_changes_are_multiple_concepts(source, target):
    v = check(source, target)
    assert not v.passed and "multiple_concepts" in v.violations


@pytest.mark.parametrize(
    "source,target",
    [
        ("A teddy bear sits on a bed.", "A rubber duck sits on a bed."),  # a two-word phrase is one concept
        ("The dog is on the grass.", "The dogs are on the grass."),  # agreement, not a second change
        ("A man holds his cup.", "A woman holds her cup."),
        ("A dog sits on the grass.", "Two dogs sit on the grass."),  # only the count changed
    ],
)
def test_adjacent_phrase_and_agreement_stay_one_concept(source, target):
    assert check(source, target).passed
