"""Toy-only metrics over the toy world's standard-format copies, read back with the standard loaders.

Oracles read the answer off each image file the set names (never off the annotations), so a mix-up
between images, questions and references in the writer, the loaders or the scorers cannot pass."""

import numpy as np
import pytest
import torch

from blip2.datasets.captions import CaptionedImage
from blip2.datasets.errors import DatasetError
from blip2.datasets.tasks import load_task, question_scores, retrieval_relevance, score_captioning
from blip2.datasets.toy import (
    caption_metrics,
    matching_metrics,
    matching_texts,
    question_metrics,
    retrieval_metrics,
    set_attributes,
    toy_relevance,
)
from blip2.images import load_image
from blip2.toyworld.corpus import ToyWorldConfig, write_toyworld
from blip2.toyworld.standard import QUESTION_FAMILIES, standard_files
from blip2.toyworld.text import INSTRUCTION_TASKS, caption, parse_attributes
from blip2.toyworld.world import ATTRIBUTES, Attributes, read_attributes

WORLD = ToyWorldConfig(seed=2, web_size=4, clean_size=4, val_size=4, test_size=12, novel_size=4, parquet=False,
                       webdataset=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_standard")
    write_toyworld(WORLD, root)
    return standard_files(root, "test")


def pixels(path) -> Attributes:
    """What the image file shows, read off its pixels."""
    return read_attributes(np.asarray(load_image(path.read_bytes())))


def oracle_answer(question: str, truth: Attributes) -> str:
    asked = parse_attributes(question)
    if asked:  # yes/no: "is the shape red?", "is there a red circle?"
        return "yes" if all(getattr(truth, name) == value for name, value in asked.items()) else "no"
    return next(getattr(truth, task) for task in ("colour", "shape", "size", "position")
                if question in INSTRUCTION_TASKS[task])


def test_references_give_each_images_attributes_and_a_real_set_is_refused(files):
    images = load_task("coco_captions", files["karpathy"], files["images"])
    assert set_attributes(images) == [pixels(image.path) for image in images]
    real = CaptionedImage("1", files["images"], ("A man riding a horse on a beach.", "a man on a horse"))
    with pytest.raises(DatasetError, match="toy-world set"):
        set_attributes([real])


def test_captions_oracle_and_shifted(files):
    images = load_task("coco_captions", files["coco_captions"], files["images"])
    truth = [pixels(image.path) for image in images]
    oracle = [caption(a, 3) for a in truth]
    scores = caption_metrics(oracle, set_attributes(images), num_examples=2)
    assert scores["caption_accuracy"] == 1.0 and all(scores[f"attribute_accuracy/{n}"] == 1.0 for n in ATTRIBUTES)
    assert scores["examples"] == [{"caption": oracle[i], "truth": caption(truth[i])} for i in range(2)]
    assert score_captioning(oracle, images)["bleu4"] == pytest.approx(1.0)
    shifted = caption_metrics(oracle[1:] + oracle[:1], set_attributes(images))
    assert shifted["caption_accuracy"] < 0.5


def test_questions_per_family_held_in_and_out(files):
    questions = load_task("vqav2", files["vqa_annotations"], files["images"], files["vqa_questions"])
    oracle = [oracle_answer(q.question, pixels(q.path)) for q in questions]
    scores = question_metrics(oracle, questions, question_scores("vqav2", oracle, questions), held_out=("existence",))
    assert {f"accuracy/{f}" for f in QUESTION_FAMILIES} < set(scores)
    assert all(scores[f"accuracy/{f}"] == 1.0 for f in (*QUESTION_FAMILIES, "all", "held_in", "held_out"))
    assert scores["num_examples"] == 12 * len(QUESTION_FAMILIES) and len(scores["examples"]) == len(QUESTION_FAMILIES)
    others = oracle[len(QUESTION_FAMILIES):] + oracle[: len(QUESTION_FAMILIES)]  # each image gets the next's answers
    wrong = question_metrics(others, questions, question_scores("vqav2", others, questions), held_out=("existence",))
    assert wrong["accuracy/colour"] < 0.5 and wrong["accuracy/all"] < 0.8
    nothing_held_out = question_metrics(oracle, questions, [1.0] * len(questions), held_out=())
    assert "accuracy/held_out" not in nothing_held_out


def test_retrieval_strict_is_standard_recall_and_attribute_level_counts_look_alikes(files):
    images = load_task("coco_retrieval", files["karpathy"], files["images"])[:6]
    attributes = set_attributes(images)
    texts = [t for image in images for t in image.captions]
    text_image = [i for i, image in enumerate(images) for _ in image.captions]
    # an oracle ranking from the pixels: every image showing what the text states first
    shown = [pixels(image.path) for image in images]
    fits = torch.tensor([[all(getattr(truth, k) == v for k, v in parse_attributes(t).items()) for truth in shown]
                         for t in texts])
    t2i = torch.argsort(fits.float() + 0.1 * retrieval_relevance(text_image, len(images)).float(), dim=1,
                        descending=True, stable=True)
    i2t = torch.argsort(retrieval_relevance(text_image, len(images)).t().float(), dim=1, descending=True, stable=True)
    relevance = toy_relevance(texts, text_image, attributes)
    scores = retrieval_metrics(t2i, i2t, relevance, ks=(1, 5))
    assert scores["t2i_r1_strict"] == scores["t2i_r1_attribute"] == scores["i2t_r1_attribute"] == 1.0
    wrong = torch.stack([torch.arange(6).roll(-i - 1) for i in text_image])  # own image last
    shifted = retrieval_metrics(wrong, i2t, relevance, ks=(1, 5), suffix="_itc")
    assert shifted["t2i_r5_strict_itc"] == 0.0 and shifted["t2i_r1_attribute_itc"] >= shifted["t2i_r1_strict_itc"]


def test_matching_from_logits():
    truth = [Attributes("circle", "red", "small", "left"), Attributes("square", "blue", "large", "right")]
    pairs = matching_texts(truth, seed=0)
    assert [parse_attributes(t) for t in pairs.right] == [a.as_dict() for a in truth]
    scores = matching_metrics([3.0, 2.0], {"one_attribute": [-1.0, 2.5], "random": [-4.0, -3.0]})
    assert scores["itm_pairwise_random"] == 1.0 and scores["itm_pairwise_one_attribute"] == 0.5
    assert scores["itm_right_accuracy"] == 1.0 and scores["itm_num_images"] == 2
