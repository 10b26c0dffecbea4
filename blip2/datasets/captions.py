"""Captioned images: COCO captions (and NoCaps, which uses COCO's format) and the Karpathy split.

Published layouts read here:

- **COCO captions** ``captions_<split>.json``: ``{"images": [{"id", "file_name", ...}],
  "annotations": [{"id", "image_id", "caption"}]}``, about five annotations per image, in any order.
  NoCaps' ``nocaps_val_4500_captions.json`` is the same format, and its images carry a ``domain``
  (``in-domain`` / ``near-domain`` / ``out-domain``).
- **Karpathy split as LAVIS ships it** ``coco_karpathy_{train,val,test}.json``: a list of entries
  ``{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [...]}`` with the path relative to the
  image root; val/test entries hold a list of captions, train entries one caption each (an image then
  appears in several entries, which are merged here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blip2.datasets.errors import DatasetError, field, read_json, require_dir

COCO_CAPTIONS_WHAT = "a COCO captions JSON (images + annotations, e.g. annotations/captions_val2014.json)"
KARPATHY_WHAT = "a Karpathy-split JSON as LAVIS ships it (e.g. coco_karpathy_test.json: a list of image, caption)"


@dataclass(frozen=True)
class CaptionedImage:
    """One image with its reference captions (surrounding whitespace stripped, text otherwise as given)."""

    image_id: str  # COCO's integer id as a string, or the Karpathy entry's relative image path
    path: Path
    captions: tuple[str, ...]
    domain: str = ""  # NoCaps' in-domain / near-domain / out-domain; empty elsewhere


def _check_images_exist(images: Sequence[CaptionedImage], image_dir: Path, what: str) -> None:
    missing = [image.path for image in images if not image.path.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise DatasetError(f"{len(missing)} of {len(images)} images are missing under {image_dir} "
                           f"(e.g. {shown}): put {what} there (nothing is downloaded)")


def load_coco_captions(annotations: str | Path, image_dir: str | Path,
                       require_captions: bool = True) -> list[CaptionedImage]:
    """Images of a COCO-format captions file, in the file's ``images`` order, each with its captions.

    ``image_dir`` holds the files named by ``file_name``. An image without captions is an error unless
    ``require_captions`` is False (NoCaps' test images, say, whose captions are not public); an
    annotation naming an image the file does not list is always an error.
    """
    path = Path(annotations)
    data = read_json(path, COCO_CAPTIONS_WHAT)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected {COCO_CAPTIONS_WHAT}; found no 'images' list")
    image_dir = require_dir(image_dir, f"the images that {path.name} names")
    captions: dict[str, list[str]] = {}
    images: dict[str, dict] = {}
    for index, entry in enumerate(data["images"]):
        image_id = str(field(entry, "id", path, f"images[{index}]"))
        if image_id in images:
            raise DatasetError(f"{path}: image id {image_id} is listed twice")
        images[image_id] = entry
        captions[image_id] = []
    for index, entry in enumerate(data.get("annotations", [])):
        image_id = str(field(entry, "image_id", path, f"annotations[{index}]"))
        text = field(entry, "caption", path, f"annotations[{index}]")
        if image_id not in captions:
            raise DatasetError(f"{path}: annotations[{index}] is about image {image_id}, which 'images' does not list")
        captions[image_id].append(str(text).strip())
    bare = [image_id for image_id, texts in captions.items() if not texts]
    if bare and require_captions:
        raise DatasetError(f"{path}: {len(bare)} images have no caption (e.g. image {bare[0]}); "
                           f"captioning is scored against references")
    result = [CaptionedImage(image_id, image_dir / str(field(entry, "file_name", path, f"image {image_id}")),
                             tuple(captions[image_id]), str(entry.get("domain", "")))
              for image_id, entry in images.items()]
    if not result:
        raise DatasetError(f"{path} lists no images")
    _check_images_exist(result, image_dir, f"the images that {path.name} names")
    return result


def load_karpathy(annotations: str | Path, image_root: str | Path) -> list[CaptionedImage]:
    """Images of a Karpathy-split file, in order of first appearance, each with all its captions.

    ``image_root`` is the directory the entries' ``image`` paths are relative to (LAVIS: ``coco/images``).
    """
    path = Path(annotations)
    data = read_json(path, KARPATHY_WHAT)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected {KARPATHY_WHAT}; found a {type(data).__name__}")
    image_root = require_dir(image_root, f"the COCO images that {path.name} names (e.g. val2014/)")
    captions: dict[str, list[str]] = {}
    for index, entry in enumerate(data):
        image = str(field(entry, "image", path, f"entry {index}"))
        text = field(entry, "caption", path, f"entry {index}")
        texts = [text] if isinstance(text, str) else list(text)
        captions.setdefault(image, []).extend(str(t).strip() for t in texts)
    if not captions:
        raise DatasetError(f"{path} lists no images")
    bare = [image for image, texts in captions.items() if not texts]
    if bare:
        raise DatasetError(f"{path}: {len(bare)} entries have an empty caption list (e.g. {bare[0]})")
    result = [CaptionedImage(image, image_root / image, tuple(texts)) for image, texts in captions.items()]
    _check_images_exist(result, image_root, f"the COCO images that {path.name} names")
    return result


def retrieval_texts(images: Sequence[CaptionedImage]) -> tuple[list[str], list[int]]:
    """Every caption as a retrieval query, with the index of its image: ``(texts, text_image)``.

    The Karpathy test set gives 5,000 images and about 25,000 texts; a text is relevant to its own image
    only, and an image to each of its captions (recall counts a hit on any of them)."""
    texts: list[str] = []
    text_image: list[int] = []
    for index, image in enumerate(images):
        texts += image.captions
        text_image += [index] * len(image.captions)
    return texts, text_image
