import numpy as np
import pytest
from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessorPil, InstructBlipProcessor

from blip2.backbones.build import PACKAGED_BACKBONES
from blip2.tokenization import DEC_TOKEN, IMAGE_TOKEN, build_lm_tokenizer, build_qformer_tokenizer, qformer_vocabulary
from blip2.toyworld.text import vocabulary_text

TEXT = "there is a small red circle on the left"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    build_qformer_tokenizer(vocabulary_text()).save_pretrained(root / "qformer")
    build_lm_tokenizer(vocabulary_text()).save_pretrained(root / "lm")
    return AutoTokenizer.from_pretrained(root / "qformer"), AutoTokenizer.from_pretrained(root / "lm")


def test_qformer_tokenizer_is_bert_style_with_dec(tokenizers):
    qformer, _ = tokenizers
    ids = qformer(TEXT).input_ids
    tokens = qformer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "[UNK]" not in tokens  # every toy word is in the vocabulary
    assert qformer.decode(ids, skip_special_tokens=True) == TEXT
    assert qformer.convert_tokens_to_ids(DEC_TOKEN) != qformer.unk_token_id
    assert qformer.decode(qformer("A Large RED Star").input_ids, skip_special_tokens=True) == "a large red star"


def test_lm_tokenizer_round_trips_anything(tokenizers):
    _, lm = tokenizers
    for text in (TEXT, "IMG_0412.JPG", "click to enlarge", "naïve café ☕"):  # byte-level: no unknowns
        ids = lm(text).input_ids
        assert ids[0] == lm.bos_token_id
        assert lm.decode(ids, skip_special_tokens=True).strip() == text
    assert lm.convert_tokens_to_ids(IMAGE_TOKEN) != lm.unk_token_id
    assert lm.padding_side == "left"


def test_tokenizers_work_inside_transformers_processors(tokenizers):
    qformer, lm = tokenizers
    image_processor = BlipImageProcessorPil(size={"height": 64, "width": 64})
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    blip2 = Blip2Processor(image_processor, lm, num_query_tokens=4)
    out = blip2(images=[image], text=["a photo of"], return_tensors="pt")
    image_id = lm.convert_tokens_to_ids(IMAGE_TOKEN)
    assert out.input_ids[0, :4].tolist() == [image_id] * 4 and out.input_ids[0, 4] == lm.bos_token_id
    assert out.pixel_values.shape == (1, 3, 64, 64)
    instruct = InstructBlipProcessor(image_processor, lm, qformer, num_query_tokens=4)
    out = instruct(images=[image], text=["what colour is the shape?"], return_tensors="pt")
    assert out.qformer_input_ids[0, 0] == qformer.cls_token_id
    assert (out.input_ids[0] == image_id).sum() == 4


def test_both_tokenizers_build_byte_identical_every_time(tmp_path):
    """What `blip2 backbones` writes for the tokenizers, built twice in one process: the same bytes, and
    the bytes that ship."""
    for attempt in range(2):
        build_qformer_tokenizer(vocabulary_text()).save_pretrained(tmp_path / f"qformer{attempt}")
        build_lm_tokenizer(vocabulary_text()).save_pretrained(tmp_path / f"lm{attempt}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        for built, shipped in (("qformer0", "qformer_tokenizer"), ("qformer1", "qformer_tokenizer"),
                               ("lm0", "opt"), ("lm1", "opt"), ("lm1", "t5")):
            assert (tmp_path / built / name).read_bytes() == (PACKAGED_BACKBONES / shipped / name).read_bytes()


def test_qformer_vocabulary_is_chosen_in_a_stated_order():
    vocabulary = qformer_vocabulary(["b a a", "c b a"], vocab_size=200)
    assert vocabulary[:6] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    assert len(vocabulary) == len(set(vocabulary)) == 6 + 26 + 10 + 32 + 36  # single letters are already in
    words = qformer_vocabulary(["the cat", "the dog", "dog"], vocab_size=200)[110:]
    assert words == ["dog", "the", "cat"]  # by falling count, ties by the word
    assert qformer_vocabulary(["the cat", "the dog", "dog"], vocab_size=111)[110:] == ["dog"]
    with pytest.raises(ValueError, match="vocab_size 100 cannot hold"):
        qformer_vocabulary(["x"], vocab_size=100)


def test_qformer_tokenizer_has_no_unknowns_for_any_ascii_word(tokenizers):
    qformer, _ = tokenizers
    for text in ("xylophone quartz", "IMG_0412.JPG", "naïve café", "50% off! (today)"):
        tokens = qformer.convert_ids_to_tokens(qformer(text).input_ids)
        assert "[UNK]" not in tokens, (text, tokens)
