"""COCO captions, NoCaps and Karpathy loaders on small files written in the published formats."""

import json
from pathlib import Path

import pytest

from blip2.datasets.captions import load_coco_captions, load_karpathy, retrieval_texts
from blip2.datasets.errors import DatasetError


def _images(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\xff\xd8 not decoded by the loader")


def _coco(tmp_path: Path, images: list[dict], annotations: list[dict]) -> Path:
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "type": "captions", "images": images,
                                "annotations": annotations}))
    return path


def test_coco_captions_groups_several_captions_per_image_in_images_order(tmp_path):
    _images(tmp_path / "val2014", "COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg")
    path = _coco(tmp_path, [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 640, "height": 480},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 640, "height": 480},
    ], [  # interleaved, as in the real files; one caption with the trailing newline some real ones have
        {"id": 1, "image_id": 7, "caption": "A dog on a couch.\n"},
        {"id": 2, "image_id": 42, "caption": "Two cats."},
        {"id": 3, "image_id": 7, "caption": " a brown dog lying down"},
        {"id": 4, "image_id": 42, "caption": "cats sleeping"},
        {"id": 5, "image_id": 7, "caption": "dog"},
    ])
    images = load_coco_captions(path, tmp_path / "val2014")
    assert [i.image_id for i in images] == ["42", "7"]
    assert images[1].captions == ("A dog on a couch.", "a brown dog lying down", "dog")
    assert images[0].path == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    texts, owner = retrieval_texts(images)
    assert len(texts) == 5 and owner == [0, 0, 1, 1, 1]


def test_nocaps_domains_and_images_without_captions(tmp_path):
    _images(tmp_path, "a.jpg", "b.jpg")
    path = _coco(tmp_path, [{"id": 0, "file_name": "a.jpg", "domain": "out-domain", "open_images_id": "x"},
                            {"id": 1, "file_name": "b.jpg", "domain": "in-domain"}],
                 [{"id": 0, "image_id": 0, "caption": "a jellyfish"}])
    with pytest.raises(DatasetError, match="1 images have no caption"):
        load_coco_captions(path, tmp_path)
    images = load_coco_captions(path, tmp_path, require_captions=False)
    assert [(i.domain, i.captions) for i in images] == [("out-domain", ("a jellyfish",)), ("in-domain", ())]


def test_coco_errors_name_the_file_and_what_to_put_there(tmp_path):
    with pytest.raises(DatasetError, match="missing .*captions_val2014.json: put a COCO captions JSON"):
        load_coco_captions(tmp_path / "captions_val2014.json", tmp_path)
    path = _coco(tmp_path, [{"id": 1, "file_name": "gone.jpg"}], [{"id": 0, "image_id": 1, "caption": "x"}])
    with pytest.raises(DatasetError, match="1 of 1 images are missing .*gone.jpg"):
        load_coco_captions(path, tmp_path)
    path = _coco(tmp_path, [{"id": 1, "file_name": "gone.jpg"}], [{"id": 0, "image_id": 9, "caption": "x"}])
    with pytest.raises(DatasetError, match="image 9, which 'images' does not list"):
        load_coco_captions(path, tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco_captions(tmp_path / "bad.json", tmp_path)
    with pytest.raises(DatasetError, match="no 'images' list"):
        load_coco_captions(_karpathy(tmp_path, []), tmp_path)


def _karpathy(tmp_path: Path, entries: list[dict], name: str = "coco_karpathy_test.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def test_karpathy_test_and_train_layouts(tmp_path):
    first, second = "val2014/COCO_val2014_000000391895.jpg", "val2014/COCO_val2014_000000522418.jpg"
    _images(tmp_path / "images", first, second)
    test = _karpathy(tmp_path, [{"image": first, "caption": [f"caption {i}" for i in range(5)]},
                                {"image": second, "caption": ["a woman cutting a cake ", *"bcde"]}])
    images = load_karpathy(test, tmp_path / "images")
    assert [i.image_id for i in images] == [first, second]
    assert images[1].captions[0] == "a woman cutting a cake" and len(images[1].captions) == 5
    assert images[0].path == tmp_path / "images" / first
    # The train file has one caption per entry and repeats the image: merged, in order.
    train = _karpathy(tmp_path, [{"image": first, "caption": "one", "image_id": "coco_391895"},
                                 {"image": second, "caption": "other", "image_id": "coco_522418"},
                                 {"image": first, "caption": "two", "image_id": "coco_391895"}],
                      "coco_karpathy_train.json")
    merged = load_karpathy(train, tmp_path / "images")
    assert [(i.image_id, i.captions) for i in merged] == [(first, ("one", "two")), (second, ("other",))]


def test_karpathy_errors(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="missing directory .*nowhere"):
        load_karpathy(_karpathy(tmp_path, [{"image": "x.jpg", "caption": ["c"]}]), tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="images are missing"):
        load_karpathy(_karpathy(tmp_path, [{"image": "x.jpg", "caption": ["c"]}]), tmp_path / "images")
    with pytest.raises(DatasetError, match="entry 0 has no 'caption'"):
        load_karpathy(_karpathy(tmp_path, [{"image": "x.jpg"}]), tmp_path / "images")
    with pytest.raises(DatasetError, match="expected a Karpathy-split JSON"):
        load_karpathy(_coco(tmp_path, [], []), tmp_path / "images")
