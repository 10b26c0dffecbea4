"""The toy world's held-out splits in standard formats read back through the standard loaders."""

from collections import Counter

from blip2.datasets.captions import load_coco_captions, load_karpathy
from blip2.datasets.questions import load_gqa, load_vqa
from blip2.toyworld.corpus import generate_split
from blip2.toyworld.standard import QUESTION_FAMILIES, standard_files
from blip2.toyworld.text import caption_matches
from blip2.vqa_accuracy import mean_accuracy

from tests.conftest import SMALL_WORLD


def test_held_out_splits_read_back_through_the_standard_loaders(small_world):
    root, summary = small_world
    for split in ("val", "test", "novel"):
        records = generate_split(SMALL_WORLD, split)
        files = standard_files(root, split)
        karpathy = load_karpathy(files["karpathy"], files["images"])
        coco = load_coco_captions(files["coco_captions"], files["images"])
        assert len(karpathy) == len(coco) == len(records) == summary.counts[split]
        for image, coco_image, record in zip(karpathy, coco, records, strict=True):
            assert image.path.read_bytes() == record.image
            assert image.captions == coco_image.captions and len(image.captions) == 6
            assert all(caption_matches(text, record.attributes) for text in image.captions)
        vqa = load_vqa(files["vqa_questions"], files["vqa_annotations"], files["images"])
        gqa = load_gqa(files["gqa_questions"], files["images"])
        assert len(vqa) == len(gqa) == len(records) * len(QUESTION_FAMILIES)
        assert Counter(q.question_type for q in vqa) == {f: len(records) for f in QUESTION_FAMILIES}
        for question in vqa:
            assert len(question.answers) == 10 and len(set(question.answers)) == 1
            assert question.path.read_bytes() == records[int(question.image_id)].image
        assert [q.path for q in gqa] == [q.path for q in vqa]
        # One answer from all ten annotators: VQA accuracy is exact match, and equals GQA's.
        truth = [q.answers[0] for q in vqa]
        assert mean_accuracy(truth, [q.answers for q in vqa]) == 1.0
        assert mean_accuracy(truth, [q.answers for q in gqa], single=True) == 1.0
        wrong = ["no" if a == "yes" else "yes" for a in truth]
        assert mean_accuracy(wrong, [q.answers for q in vqa]) == 0.0
