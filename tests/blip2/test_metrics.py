import math

import numpy as np
import pytest
import torch

from blip2.metrics import (
    accuracy_by_task,
    attribute_relevance,
    bleu4,
    caption_attribute_accuracy,
    caption_tokens,
    cider_d,
    cider_d_scores,
    exact_match,
    filter_precision_recall,
    identity_relevance,
    normalise_answer,
    recall_at_k,
    rerank_effect,
)
from blip2.toyworld.text import caption, parse_attributes
from blip2.toyworld.world import Attributes, all_attributes

RED_CIRCLE = Attributes("circle", "red", "large", "left")

# ---------------------------------------------------------------------------------------------------
# Retrieval


def test_recall_at_k_on_a_constructed_ranking():
    relevant = torch.eye(3, dtype=torch.bool)
    ranking = torch.tensor([[0, 1, 2],   # right image first
                            [0, 2, 1],   # right image third
                            [1, 2, 0]])  # right image second
    assert recall_at_k(ranking, relevant, ks=(1, 2, 3)) == pytest.approx(
        {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 1.0})
    # k above the number of columns is clipped: every row is a hit within all columns.
    assert recall_at_k(ranking, relevant, ks=(10,)) == {"recall@10": 1.0}
    # Attribute-level relevance: row 1's caption also fits image 2, ranked second, so recall@2 rises.
    relevant[1, 2] = True
    assert recall_at_k(ranking, relevant, ks=(1, 2))["recall@2"] == pytest.approx(1.0)
    # A row with no relevant column is a miss at every k.
    relevant[0] = False
    assert recall_at_k(ranking, relevant, ks=(3,)) == pytest.approx({"recall@3": 2 / 3})


def test_recall_at_k_from_scores_and_top_k_lists():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.1, 0.2, 0.7]])  # (R=2, C=4)
    relevant = torch.tensor([[False, False, True, False], [False, False, False, True]])
    ranking = scores.argsort(dim=1, descending=True)  # [[1, 2, 3, 0], [0, 3, 2, 1]]
    full = recall_at_k(ranking, relevant, ks=(1, 2, 5))
    assert full == pytest.approx({"recall@1": 0.0, "recall@2": 1.0, "recall@5": 1.0})
    top2 = scores.topk(2, dim=1).indices  # a truncated ranking is enough for k <= 2
    assert recall_at_k(top2, relevant, ks=(1, 2)) == pytest.approx({"recall@1": 0.0, "recall@2": 1.0})
    with pytest.raises(ValueError, match="needs the top 3 columns"):
        recall_at_k(top2, relevant, ks=(3,))


def test_recall_at_k_rejects_bad_inputs():
    relevant = torch.eye(2, dtype=torch.bool)
    ranking = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(ranking[:1], relevant)
    with pytest.raises(ValueError, match="integer"):
        recall_at_k(ranking.float(), relevant)
    with pytest.raises(ValueError, match="bool"):
        recall_at_k(ranking, relevant.long())
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.tensor([[0, 2], [1, 0]]), relevant)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(ranking, relevant, ks=(0,))


def test_identity_relevance_with_several_captions_per_image():
    relevant = identity_relevance(["a", "b", "a"], ["a", "b"])
    assert relevant.tolist() == [[True, False], [False, True], [True, False]]
    assert torch.equal(identity_relevance(range(4), range(4)), torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-empty"):
        identity_relevance([], ["a"])


def test_attribute_relevance_with_partial_captions():
    images = [RED_CIRCLE, Attributes("square", "red", "small", "left"), Attributes("circle", "blue", "large", "right")]
    texts = ["a red circle", "something on the left", "IMG_0412.JPG", "a green star",
             "a large red circle on the left"]
    relevant = attribute_relevance([parse_attributes(t) for t in texts], [a.as_dict() for a in images])
    assert relevant.shape == (5, 3)
    assert relevant.tolist() == [
        [True, False, False],   # colour + shape: only the red circle
        [True, True, False],    # position only: both images on the left
        [True, True, True],     # states nothing: fits every image (vacuously)
        [False, False, False],  # fits none
        [True, False, False],   # fully stated
    ]
    # An attribute the image does not have never fits; a hedged attribute is not stated at all.
    assert attribute_relevance([{"texture": "striped"}], [RED_CIRCLE.as_dict()]).tolist() == [[False]]
    assert attribute_relevance([parse_attributes("a red or blue circle")], [images[2].as_dict()]).tolist() == [[True]]
    with pytest.raises(ValueError, match="non-empty"):
        attribute_relevance([], [RED_CIRCLE.as_dict()])


def test_attribute_relevance_agrees_with_dict_comparison_on_the_whole_world():
    images = [a.as_dict() for a in all_attributes()[::11]]
    captions = [{k: v for k, v in a.items() if k in keep} for a, keep in
                zip(images, [("colour",), ("shape", "size"), (), ("colour", "shape", "size", "position")] * 50)]
    expected = [[all(image.get(k) == v for k, v in c.items()) for image in images] for c in captions]
    assert attribute_relevance(captions, images).tolist() == expected


# ---------------------------------------------------------------------------------------------------
# Captioning


def test_caption_attribute_accuracy_overall_and_per_attribute():
    captions = ["a large red circle on the left",         # all right
                "a large blue circle on the left",        # colour wrong
                "a red circle",                           # size and position unstated
                "IMG_0001.JPG",                           # states nothing
                "a large red or blue circle on the left"]  # colour hedged
    accuracy = caption_attribute_accuracy(captions, [RED_CIRCLE] * 5)
    assert accuracy == pytest.approx({"all": 1 / 5, "shape": 4 / 5, "colour": 2 / 5, "size": 3 / 5, "position": 3 / 5})
    assert caption_attribute_accuracy([caption(RED_CIRCLE, t) for t in range(6)], [RED_CIRCLE] * 6)["all"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        caption_attribute_accuracy(captions, [RED_CIRCLE])
    with pytest.raises(ValueError, match="empty"):
        caption_attribute_accuracy([], [])


def test_caption_tokens_lowercases_and_splits_punctuation():
    assert caption_tokens("A small, red circle on the LEFT.") == ["a", "small", "red", "circle", "on", "the", "left"]
    assert caption_tokens("red,blue") == ["red", "blue"]
    assert caption_tokens("  ") == []


def test_bleu4_identical_and_case_punctuation_insensitive():
    text = "a small red circle on the left"
    assert bleu4([text], [[text]]) == pytest.approx(1.0)
    assert bleu4(["A small, red circle on the LEFT."], [[text]]) == pytest.approx(1.0)


def test_bleu4_brevity_penalty_and_hand_worked_precisions():
    # Every n-gram of a 4-token prefix matches; only the brevity penalty bites: exp(1 - 8/4).
    assert bleu4(["a small red circle"], [["a small red circle on the far left"]]) == pytest.approx(math.exp(-1))
    # Dropping one word: p = 6/6, 4/5, 3/4, 2/3; c = 6, r = 7.
    expected = math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu4(["a red circle on the left"], [["a small red circle on the left"]]) == pytest.approx(expected)


def test_bleu4_clips_repeated_ngrams():
    # "red" twice is credited once: p = 5/6, 4/5, 3/4, 2/3; equal lengths, so BP = 1.
    score = bleu4(["red red circle on the left"], [["a red circle on the left"]])
    assert score == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)


def test_bleu4_uses_the_closest_reference_length_ties_to_the_shorter():
    long_ref = "a small red circle on the far left"  # 8 tokens
    assert bleu4(["a small red circle"], [[long_ref, "small red circle"]]) == pytest.approx(1.0)  # r = 3
    # 2 and 6 tokens are equally close to 4: the shorter counts, so there is no penalty.
    assert bleu4(["a small red circle"], [["a small red circle on the", "red circle"]]) == pytest.approx(1.0)


def test_bleu4_sums_over_the_corpus_before_dividing():
    candidates = ["a red circle on the left", "a large blue square at the top"]
    references = [["a small red circle on the left"], ["a large blue square at the top"]]
    expected = math.exp(1 - 14 / 13) * (13 / 13 * 10 / 11 * 8 / 9 * 6 / 7) ** 0.25
    assert bleu4(candidates, references) == pytest.approx(expected)
    sentence_mean = (bleu4(candidates[:1], references[:1]) + 1.0) / 2
    assert bleu4(candidates, references) != pytest.approx(sentence_mean)


def test_bleu4_edge_cases():
    assert bleu4(["red circle"], [["red circle"]]) == 0.0  # no 4-grams, no smoothing
    assert bleu4([""], [["a red circle on the left"]]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        bleu4([], [])
    with pytest.raises(ValueError, match="differ in length"):
        bleu4(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="is a string"):
        bleu4(["a red circle"], ["a red circle"])
    with pytest.raises(ValueError, match="at least one reference"):
        bleu4(["a red circle"], [[]])


def test_cider_d_hand_checked_tiny_cases():
    references = [["red circle"], ["blue square"]]  # every n-gram occurs in one of N = 2 images: idf log 2
    # Exact matches: cosine 1 for n = 1, 2; no 3- or 4-grams, so 10 * (1 + 1 + 0 + 0) / 4.
    assert cider_d(["red circle", "blue square"], references) == pytest.approx(5.0)
    # "red square" vs "red circle": unigram cosine 1/2, bigram 0 -> 10 * 0.5 / 4 = 1.25.
    assert cider_d_scores(["red square", "blue square"], references) == pytest.approx([1.25, 5.0])
    # Repetition: counts clip to the reference's (unigram 1/2, bigram 1/sqrt(5)) and the 4-vs-2-token
    # length difference costs exp(-(4 - 2)^2 / (2 * 6^2)).
    expected = 10 * math.exp(-4 / 72) * (0.5 + 1 / math.sqrt(5)) / 4
    assert cider_d_scores(["red circle red circle", "blue square"], references) == pytest.approx([expected, 5.0])


def test_cider_d_prefers_the_right_caption_and_averages_over_references():
    images = [RED_CIRCLE, Attributes("square", "blue", "small", "top"), Attributes("star", "green", "large", "bottom"),
              Attributes("triangle", "white", "small", "centre")]
    references = [[caption(a, t) for t in range(3)] for a in images]
    right = cider_d_scores([caption(a, 0) for a in images], references)
    wrong = cider_d_scores([caption(a, 0) for a in images[1:] + images[:1]], references)
    assert (right > wrong).all()
    assert cider_d([caption(a, 0) for a in images], references) > 3.0 > 0.5 > cider_d(
        [caption(a, 0) for a in images[1:] + images[:1]], references)
    # A long exact match with distinctive n-grams against its only reference scores the maximum, 10.
    assert cider_d_scores(["a large red circle on the left", "a small blue square"],
                          [["a large red circle on the left"], ["a small blue square"]])[0] == pytest.approx(10.0)


def test_cider_d_edge_cases():
    assert cider_d(["red circle"], [["red circle"]]) == 0.0  # one image: every idf is log(1/1) = 0
    assert cider_d(["", "blue square"], [["red circle"], ["blue square"]]) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="empty"):
        cider_d([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["red circle"], [[]])


# ---------------------------------------------------------------------------------------------------
# Instructions


def test_exact_match_normalises():
    assert normalise_answer("  A  Large red circle!  ") == "a large red circle"
    predictions = ["Red.", " red ", "blue", "a  large red circle!", "yes?"]
    answers = ["red", "red", "red", "a large red circle", "yes"]
    assert exact_match(predictions, answers) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="empty"):
        exact_match([], [])


def test_accuracy_by_task_micro_averages_held_in_and_held_out():
    tasks = ["colour", "colour", "shape", "existence", "existence", "existence"]
    answers = ["red", "blue", "circle", "yes", "no", "no"]
    predictions = ["red", "green", "Circle.", "yes", "yes", "yes"]
    accuracy = accuracy_by_task(predictions, answers, tasks)  # held out: ("existence",)
    assert accuracy == pytest.approx({"colour": 0.5, "shape": 1.0, "existence": 1 / 3, "all": 0.5,
                                      "held_in": 2 / 3,  # micro: 2 of 3 examples, not mean(0.5, 1.0)
                                      "held_out": 1 / 3})
    without = accuracy_by_task(predictions, answers, tasks, held_out=())
    assert "held_out" not in without and without["held_in"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="collide"):
        accuracy_by_task(["a"], ["a"], ["all"])
    with pytest.raises(ValueError, match="differ in length"):
        accuracy_by_task(["a", "b"], ["a", "b"], ["colour"])


# ---------------------------------------------------------------------------------------------------
# Filtering


def test_filter_precision_recall_counts_and_scores():
    result = filter_precision_recall([True, True, False, False, True], [True, False, True, False, True])
    assert result == pytest.approx({"tp": 2, "fp": 1, "fn": 1, "tn": 1,
                                    "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert filter_precision_recall(np.array([1, 0]), np.array([1, 0]))["f1"] == 1.0


def test_filter_precision_recall_edge_cases_are_nan_free():
    no_flags = filter_precision_recall([False, False], [True, False])
    assert (no_flags["precision"], no_flags["recall"], no_flags["f1"]) == (1.0, 0.0, 0.0)
    nothing_to_find = filter_precision_recall([False, False], [False, False])
    assert (nothing_to_find["precision"], nothing_to_find["recall"], nothing_to_find["f1"]) == (1.0, 1.0, 1.0)
    flags_everything = filter_precision_recall([True, True], [False, False])
    assert (flags_everything["precision"], flags_everything["recall"], flags_everything["f1"]) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        filter_precision_recall([], [])
    with pytest.raises(ValueError, match="differ in length"):
        filter_precision_recall([True], [True, False])


def test_rerank_effect_counts_what_the_re_rank_did_to_each_top_1():
    relevant = torch.tensor([[True, False, False], [False, True, False], [False, False, True], [True, True, False]])
    baseline = torch.tensor([[0, 1, 2], [0, 1, 2], [2, 0, 1], [0, 1, 2]])
    reranked = torch.tensor([[1, 0, 2], [1, 0, 2], [2, 0, 1], [1, 0, 2]])
    # query 0: right -> wrong; query 1: wrong -> right; query 2 unchanged; query 3: right -> another right image
    assert rerank_effect(reranked, baseline, relevant) == {"changed": 0.75, "fixed": 1, "broken": 1}
    assert rerank_effect(baseline, baseline, relevant) == {"changed": 0.0, "fixed": 0, "broken": 0}
    with pytest.raises(ValueError, match="same"):
        rerank_effect(reranked[:2], baseline, relevant)
