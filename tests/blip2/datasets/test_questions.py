"""VQAv2 / OK-VQA and GQA loaders on small files written in the published formats."""

import json
from pathlib import Path

import pytest

from blip2.datasets.errors import DatasetError
from blip2.datasets.questions import load_gqa, load_vqa


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"jpeg")


def _answers(*words: str) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def _vqa_files(tmp_path: Path, questions: list[dict], annotations: list[dict]) -> tuple[Path, Path]:
    q = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = tmp_path / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                             "data_subtype": "val2014", "license": {}, "questions": questions}))
    a.write_text(json.dumps({"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {},
                             "annotations": annotations}))
    return q, a


def test_vqav2_ten_answers_kept_as_annotated_and_2014_or_2017_image_names(tmp_path):
    _touch(tmp_path / "val2014" / "COCO_val2014_000000262148.jpg")
    _touch(tmp_path / "val2014" / "000000000009.jpg")  # a 2017-style name
    ten = ["Two", "2", "2", "two ", "2", "3", "2", "2", "2", "2"]
    q, a = _vqa_files(tmp_path, [
        {"image_id": 262148, "question": "How many dogs?", "question_id": 262148000},
        {"image_id": 9, "question": "Is it raining?", "question_id": 9001},
    ], [  # annotations in another order than the questions
        {"question_id": 9001, "image_id": 9, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "no", "answers": _answers(*["no"] * 10)},
        {"question_id": 262148000, "image_id": 262148, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": _answers(*ten)},
    ])
    questions = load_vqa(q, a, tmp_path / "val2014")
    assert [x.question_id for x in questions] == ["262148000", "9001"]
    first = questions[0]
    assert first.answers == tuple(ten) and first.answer_type == "number" and first.question_type == "how many"
    assert first.path.name == "COCO_val2014_000000262148.jpg"
    assert questions[1].path.name == "000000000009.jpg"
    only_questions = load_vqa(q, None, tmp_path / "val2014")  # test-dev: no public answers
    assert only_questions[0].answers == ()


def test_okvqa_format_five_annotators_twice(tmp_path):
    _touch(tmp_path / "COCO_val2014_000000000001.jpg")
    answers = [{"answer_id": i + 1, "raw_answer": w, "answer_confidence": "yes", "answer": w}
               for i, w in enumerate(["racing", "racing", "race", "race", "motocross", "motocross",
                                      "dirt bike", "dirt bike", "racing", "racing"])]
    q, a = _vqa_files(tmp_path, [{"image_id": 1, "question": "What sport is this?", "question_id": 10}],
                      [{"question_id": 10, "image_id": 1, "question_type": "other", "answer_type": "other",
                        "confidence": 3, "answers": answers}])
    (question,) = load_vqa(q, a, tmp_path)
    assert question.answers.count("racing") == 4 and len(question.answers) == 10


def test_vqa_errors(tmp_path):
    _touch(tmp_path / "COCO_val2014_000000000001.jpg")
    q, a = _vqa_files(tmp_path, [{"image_id": 1, "question": "q", "question_id": 1}], [])
    with pytest.raises(DatasetError, match="no annotation for question 1"):
        load_vqa(q, a, tmp_path)
    q, a = _vqa_files(tmp_path, [{"image_id": 2, "question": "q", "question_id": 1}],
                      [{"question_id": 1, "image_id": 2, "answers": _answers("x")}])
    with pytest.raises(DatasetError, match="missing .*COCO_val2014_000000000002.jpg"):
        load_vqa(q, a, tmp_path)
    with pytest.raises(DatasetError, match="put the matching VQA annotations JSON"):
        load_vqa(q, tmp_path / "absent.json", tmp_path)
    q, a = _vqa_files(tmp_path, [{"image_id": 1, "question": "q", "question_id": 1}],
                      [{"question_id": 1, "image_id": 1, "answers": _answers("x")},
                       {"question_id": 5, "image_id": 1, "answers": _answers("y")}])
    with pytest.raises(DatasetError, match="1 annotations have no question"):
        load_vqa(q, a, tmp_path)


def test_gqa_balanced_questions(tmp_path):
    _touch(tmp_path / "images" / "n161313.jpg")
    _touch(tmp_path / "images" / "2354786.jpg")
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps({
        "20968632": {"semantic": [], "entailed": [], "equivalent": ["20968632"], "question": "Is the sky blue?",
                     "imageId": "n161313", "isBalanced": True, "groups": {"global": None, "local": "13-sky"},
                     "answer": "yes", "semanticStr": "", "annotations": {}, "types":
                     {"detailed": "verifyAttr", "semantic": "attr", "structural": "verify"},
                     "fullAnswer": "Yes, the sky is blue."},
        "05515938": {"question": "What is on the table?", "imageId": "2354786", "answer": "laptop",
                     "fullAnswer": "The laptop is on the table.", "types": {"structural": "query"}},
    }))
    questions = load_gqa(path, tmp_path / "images")
    assert [(q.question_id, q.answers, q.question_type) for q in questions] == [
        ("20968632", ("yes",), "verify"), ("05515938", ("laptop",), "query")]
    assert questions[0].path == tmp_path / "images" / "n161313.jpg"
    with pytest.raises(DatasetError, match="put GQA's images"):
        load_gqa(path, tmp_path / "elsewhere")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match="an object keyed by question id"):
        load_gqa(tmp_path / "list.json", tmp_path / "images")
