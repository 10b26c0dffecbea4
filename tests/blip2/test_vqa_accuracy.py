"""Official VQA accuracy and GQA exact match on worked examples."""

import pytest

from blip2.vqa_accuracy import (
    gqa_accuracy,
    mean_accuracy,
    normalise_punctuation,
    normalise_vqa_answer,
    vqa_accuracy,
)


@pytest.mark.parametrize(("humans", "expected"), [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_min_humans_over_three_averaged_over_leave_one_out_subsets(humans, expected):
    # k humans said "cat": leaving out one of them leaves k-1 (k subsets), leaving out another leaves k.
    answers = ["cat"] * humans + ["dog"] * (10 - humans)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_normalisation_applies_only_when_humans_disagree_as_in_the_official_script():
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # unanimous: compared after stripping only
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0  # the comparison ignores case
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("The Dog.", ["dog"] * 3 + ["a dog"] * 2 + ["cat"] * 5) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 3 + ["no"] * 7) == pytest.approx(0.9)


@pytest.mark.parametrize(("raw", "normalised"), [
    ("Two dogs.", "2 dogs"),
    ("black/white", "black white"),
    ("black / white", "black white"),
    ("1,000", "1000"),
    ("2.5", "2.5"),
    ("an apple", "apple"),
    ("yes!", "yes"),
    ("couldnt've", "couldn't've"),
    ("Isnt it", "isn't it"),
    ("none", "0"),
    ("t-shirt", "t shirt"),
    ("(skiing)", "skiing"),
    ("somebody'd", "somebodyd"),  # the official table's backwards entry
])
def test_official_normalisation(raw, normalised):
    assert normalise_vqa_answer(raw) == normalised


def test_punctuation_rule_deletes_marks_touching_spaces_else_splits():
    assert normalise_punctuation("a-b c") == "a b c"
    assert normalise_punctuation("a - b") == "a  b"
    assert normalise_punctuation("3,5 a-b") == "35 ab"  # a digit-comma-digit deletes every mark


def test_gqa_exact_match_after_normalisation():
    assert gqa_accuracy("The laptop.", "laptop") == 1.0
    assert gqa_accuracy("laptops", "laptop") == 0.0
    assert mean_accuracy(["yes", "no"], [["yes"], ["yes"]], single=True) == 0.5
    assert mean_accuracy(["cat", "dog"], [["cat"] * 10, ["cat"] * 10]) == 0.5
    with pytest.raises(ValueError, match="one prediction per question"):
        mean_accuracy([], [])
    with pytest.raises(ValueError, match="has none"):
        vqa_accuracy("x", [])
