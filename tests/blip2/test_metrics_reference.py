"""BLEU-4 and CIDEr-D equal pycocoevalcap's scorers (the COCO caption evaluation) on generated corpora.

pycocoevalcap scores text that its PTB tokenizer (Java) has already tokenised; it is fed here the tokens
of :func:`blip2.metrics.caption_tokens` joined by spaces, which is what our metrics score."""

import numpy as np
import pytest

from blip2.metrics import bleu4, caption_tokens, cider_d, cider_d_scores

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402

WORDS = "a the red blue small large circle square on left right of top image shape, dog. Cat".split()


def _corpus(seed: int, images: int) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 13))))

    candidates = [sentence() for _ in range(images)]
    references = [[sentence() for _ in range(int(rng.integers(1, 6)))] for _ in range(images)]
    # Some candidates copy a reference, so high n-gram overlaps occur too.
    for i in range(0, images, 4):
        candidates[i] = references[i][0]
    return candidates, references


def _pycoco(candidates, references):
    def tokens(text):
        return " ".join(caption_tokens(text))

    res = {i: [tokens(c)] for i, c in enumerate(candidates)}
    gts = {i: [tokens(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    return bleu[3], cider, np.asarray(cider_each)


@pytest.mark.parametrize(("seed", "images"), [(0, 10), (1, 40), (2, 120), (3, 7)])
def test_bleu4_and_cider_d_equal_pycocoevalcap(seed, images):
    candidates, references = _corpus(seed, images)
    reference_bleu, reference_cider, reference_each = _pycoco(candidates, references)
    assert bleu4(candidates, references) == pytest.approx(reference_bleu, abs=1e-6)
    assert cider_d(candidates, references) == pytest.approx(reference_cider, abs=1e-6)
    np.testing.assert_allclose(cider_d_scores(candidates, references), reference_each, atol=1e-6)
