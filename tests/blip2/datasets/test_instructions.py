"""A-OKVQA and LLaVA-Instruct loaders on small files written in the published formats."""

import json
from pathlib import Path

import pytest

from blip2.datasets.errors import DatasetError
from blip2.datasets.instructions import load_aokvqa, load_llava, strip_image_marker


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"jpeg")


def aokvqa_entry(question_id: str, image_id: int, split: str = "val", **changes) -> dict:
    entry = {"split": split, "image_id": image_id, "question_id": question_id,
             "question": "What is the man by the bags awaiting? ",
             "choices": ["skateboarder", "train", "delivery", "cab"], "correct_choice_idx": 3,
             "direct_answers": ["ride", "ride", "bus", "taxi", "travelling", "traffic", "taxi", "cab", "cab", "taxi"],
             "difficult_direct_answer": False,
             "rationales": ["A train would not be on the street.", "He has bags.", "He is waiting for a taxi."]}
    entry.update(changes)
    return entry


def test_aokvqa_reads_choices_answers_rationales_and_coco_2017_names(tmp_path):
    _touch(tmp_path / "val2017" / "000000299207.jpg")
    _touch(tmp_path / "val2017" / "000000000009.jpg")
    path = tmp_path / "aokvqa_v1p0_val.json"
    path.write_text(json.dumps([aokvqa_entry("22MexNkBPpdZGX6sxbxVBH", 299207),
                                aokvqa_entry("x2", 9, correct_choice_idx=0, difficult_direct_answer=True)]))
    first, second = load_aokvqa(path, tmp_path / "val2017")
    assert first.path == tmp_path / "val2017" / "000000299207.jpg" and first.image_id == "299207"
    assert first.question == "What is the man by the bags awaiting?"  # stripped
    assert first.choices[first.correct] == "cab" and len(first.direct_answers) == 10
    assert len(first.rationales) == 3 and not first.difficult
    assert second.choices[second.correct] == "skateboarder" and second.difficult


def test_aokvqa_test_split_has_no_answers_and_reads_as_unknown(tmp_path):
    _touch(tmp_path / "test2017" / "000000000001.jpg")
    entry = aokvqa_entry("t1", 1, split="test")
    for key in ("correct_choice_idx", "direct_answers", "rationales"):
        del entry[key]
    path = tmp_path / "aokvqa_v1p0_test.json"
    path.write_text(json.dumps([entry]))
    (question,) = load_aokvqa(path, tmp_path / "test2017")
    assert question.correct == -1 and question.direct_answers == () and question.rationales == ()


@pytest.mark.parametrize("changes, message", [
    ({"correct_choice_idx": 4}, "not an index into its 4 choices"),
    ({"correct_choice_idx": True}, "not an index"),
    ({"choices": ["only"]}, "needs two or more"),
    ({"choices": "cab"}, "must be a list of strings"),
    ({"direct_answers": [1, 2]}, "must be a list of strings"),
])
def test_aokvqa_malformed_entries_are_named(tmp_path, changes, message):
    _touch(tmp_path / "000000000001.jpg")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([aokvqa_entry("q", 1, **changes)]))
    with pytest.raises(DatasetError, match=message):
        load_aokvqa(path, tmp_path)


def test_aokvqa_duplicate_question_missing_field_missing_image_and_wrong_shape(tmp_path):
    _touch(tmp_path / "000000000001.jpg")
    path = tmp_path / "a.json"
    path.write_text(json.dumps([aokvqa_entry("q", 1), aokvqa_entry("q", 1)]))
    with pytest.raises(DatasetError, match="listed twice"):
        load_aokvqa(path, tmp_path)
    entry = aokvqa_entry("q", 1)
    del entry["question"]
    path.write_text(json.dumps([entry]))
    with pytest.raises(DatasetError, match="entry 0 has no 'question' field"):
        load_aokvqa(path, tmp_path)
    path.write_text(json.dumps([aokvqa_entry("q", 2)]))
    with pytest.raises(DatasetError, match="1 images .* missing .*000000000002.jpg"):
        load_aokvqa(path, tmp_path)
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(DatasetError, match="found a dict"):
        load_aokvqa(path, tmp_path)
    path.write_text("[]")
    with pytest.raises(DatasetError, match="holds no questions"):
        load_aokvqa(path, tmp_path)


def turn(speaker: str, value: str) -> dict:
    return {"from": speaker, "value": value}


def test_llava_reads_multi_turn_conversations_and_drops_the_image_marker_wherever_it_is(tmp_path):
    _touch(tmp_path / "train2017" / "000000033471.jpg")
    _touch(tmp_path / "train2017" / "000000052846.jpg")
    path = tmp_path / "llava_instruct_150k.json"
    path.write_text(json.dumps([
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            turn("human", "<image>\nWhat are the colors of the bus in the image?"),
            turn("gpt", "The bus in the image is white and red."),
            turn("human", "What feature can be seen on the back of the bus?"),
            turn("gpt", "The back of the bus features an advertisement.")]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            turn("human", "Where is the cat positioned?\n<image>"), turn("gpt", " On a bed. ")]},
    ]))
    first, second = load_llava(path, tmp_path / "train2017")
    assert first.conversation_id == "000000033471" and first.path == tmp_path / "train2017" / "000000033471.jpg"
    assert first.turns == (("What are the colors of the bus in the image?", "The bus in the image is white and red."),
                           ("What feature can be seen on the back of the bus?",
                            "The back of the bus features an advertisement."))
    assert second.turns == (("Where is the cat positioned?", "On a bed."),)
    assert strip_image_marker("Describe <image> this.") == "Describe this."


@pytest.mark.parametrize("conversations, message", [
    ([turn("human", "<image>\nHi?")], "the last human turn has no gpt answer"),
    ([turn("gpt", "Hello."), turn("human", "<image>\nHi?")], "is from 'gpt', expected 'human'"),
    ([turn("human", "<image>"), turn("gpt", "Hello.")], "turn 0 has no text"),
    ([turn("user", "<image>\nHi?"), turn("assistant", "Hello.")], "is from 'user'"),
    ([turn("human", "<image>\nHi?"), {"value": "Hello."}], "turn 1 has no 'from' field"),
    ([], "no conversation turns"),
])
def test_llava_odd_conversations_are_named(tmp_path, conversations, message):
    _touch(tmp_path / "1.jpg")
    path = tmp_path / "l.json"
    path.write_text(json.dumps([{"id": "1", "image": "1.jpg", "conversations": conversations}]))
    with pytest.raises(DatasetError, match=message):
        load_llava(path, tmp_path)


def test_llava_text_only_entry_missing_image_and_missing_file_are_errors(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([{"id": "t", "conversations": [turn("human", "Hi?"), turn("gpt", "Hello.")]}]))
    with pytest.raises(DatasetError, match="id 't'.* has no image"):
        load_llava(path, tmp_path)
    path.write_text(json.dumps([{"id": "2", "image": "2.jpg", "conversations": [turn("human", "Hi?"),
                                                                                 turn("gpt", "Hello.")]}]))
    with pytest.raises(DatasetError, match="missing under"):
        load_llava(path, tmp_path)
    with pytest.raises(DatasetError, match="missing .*llava_instruct_150k.json"):
        load_llava(tmp_path / "llava_instruct_150k.json", tmp_path)
    with pytest.raises(DatasetError, match="missing directory"):
        load_llava(path, tmp_path / "train2017")
