"""Task scoring on oracle and wrong predictions: captioning, questions, retrieval and its ITM re-rank."""

from pathlib import Path

import pytest
import torch

from blip2.datasets.captions import CaptionedImage
from blip2.datasets.errors import DatasetError
from blip2.datasets.questions import VisualQuestion
from blip2.datasets.tasks import itm_candidates, load_task, rerank, score_captioning, score_questions, score_retrieval


def _image(i: int, captions: tuple[str, ...], domain: str = "") -> CaptionedImage:
    return CaptionedImage(str(i), Path(f"{i}.jpg"), captions, domain)


def test_captioning_scores_and_nocaps_domains():
    images = [_image(0, ("a red circle on the left", "red circle left"), "in-domain"),
              _image(1, ("a small blue square at the top",), "out-domain"),
              _image(2, ("a green star in the centre",), "out-domain")]
    perfect = score_captioning([i.captions[0] for i in images], images)
    wrong = score_captioning(["a dog", "a cat", "a dog"], images)
    assert perfect["cider_d"] > 5 > wrong["cider_d"] and perfect["bleu4"] > 0.9 and wrong["bleu4"] == 0
    assert set(perfect) >= {"cider_d/in-domain", "cider_d/out-domain"} and perfect["num_images"] == 3


def test_question_scores_break_down_by_answer_and_question_type():
    questions = [VisualQuestion("1", "1", Path("1.jpg"), "what colour?", ("red",) * 10, "other", "colour"),
                 VisualQuestion("2", "1", Path("1.jpg"), "is it red?", ("yes",) * 7 + ("no",) * 3, "yes/no", "verify")]
    metrics = score_questions("vqav2", ["red", "no"], questions)
    assert metrics["accuracy"] == pytest.approx((1 + 0.9) / 2)
    assert metrics["accuracy/answer_type/yes/no"] == pytest.approx(0.9)
    assert metrics["accuracy/question_type/colour"] == 1.0
    assert score_questions("gqa", ["Red.", "no"], questions)["accuracy"] == 0.5
    with pytest.raises(DatasetError, match="need the annotations|scoring needs the annotations"):
        score_questions("vqav2", ["x"], [VisualQuestion("3", "1", Path("1.jpg"), "q", ())])


def test_retrieval_recall_both_directions_and_itm_rerank():
    # 3 images, 2 captions each: text t belongs to image t // 2.
    text_image = [0, 0, 1, 1, 2, 2]
    similarity = torch.tensor([[0.9, 0.1, 0.8, 0.0, 0.0, 0.0],
                               [0.2, 0.3, 0.1, 0.7, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0, 0.5, 0.9]])  # (I, T); by ITC text 1 prefers image 1, text 2 image 0
    t2i, i2t = similarity.t().argsort(dim=1, descending=True), similarity.argsort(dim=1, descending=True)
    itc = score_retrieval(t2i, i2t, text_image, 3, ks=(1, 2))
    assert itc["i2t_r1"] == 1.0 and itc["t2i_r1"] == pytest.approx(4 / 6)  # texts 1 and 2 miss at rank 1
    candidates = itm_candidates(similarity, k=2)
    assert all(t in candidates[0] for t in (0, 2)) and 2 in candidates[1]  # text 2's top-2 images include 1
    # ITM knows better: text 2 matches image 1, text 1 matches image 0.
    logits = {(i, t): (5.0 if text_image[t] == i else -5.0) for i, texts in enumerate(candidates) for t in texts}
    t2i_itm, i2t_itm = rerank(similarity, logits, k=2)
    reranked = score_retrieval(t2i_itm, i2t_itm, text_image, 3, ks=(1, 2))
    assert reranked["t2i_r1"] == 1.0 and reranked["i2t_r1"] == 1.0
    assert reranked["r_mean"] == 1.0


def test_load_task_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'coco'"):
        load_task("coco", "a.json", tmp_path)
    with pytest.raises(DatasetError, match="set images="):
        load_task("vqav2", questions="q.json")
    with pytest.raises(DatasetError, match="set questions="):
        load_task("gqa", images=tmp_path)
    with pytest.raises(DatasetError, match="missing .*karpathy.json"):
        load_task("coco_retrieval", tmp_path / "karpathy.json", tmp_path)
