"""Offline tokenizers, built with the ``tokenizers`` library and wrapped as transformers tokenizers.

- The Q-Former's text side: an uncased BERT-style WordPiece with BERT's special tokens plus ``[DEC]``,
  which starts ITG (image-grounded text generation) inputs in place of ``[CLS]``. Its vocabulary is
  *chosen*, not trained: ``tokenizers``' WordPiece trainer breaks frequency ties in hash order, so two
  builds from the same texts, even in one process, gave different vocabularies (325 vs 326 tokens).
- The language models' tokenizer: byte-level BPE (so any web junk tokenizes) with ``<s>``, ``</s>``,
  ``<pad>``, ``<unk>`` and the ``<image>`` token that the BLIP-2 / InstructBLIP processors expand into
  ``num_query_tokens`` placeholders.

Both save with ``save_pretrained`` and load back with ``AutoTokenizer.from_pretrained`` like any hub
tokenizer; nothing here is needed to *use* them.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

QFORMER_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
LM_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
DEC_TOKEN = "[DEC]"
IMAGE_TOKEN = "<image>"


def qformer_vocabulary(texts: Iterable[str], vocab_size: int = 512) -> list[str]:
    """The WordPiece vocabulary, in id order: the special tokens, every lower-case ASCII letter, digit and
    punctuation mark, ``##`` + each letter and digit (so any ASCII word splits into known pieces), then
    the texts' words (as BERT's normalizer and pre-tokenizer cut them) by falling count, ties by the word
    itself, until ``vocab_size``. The same texts always give the same list."""
    singles = [*string.ascii_lowercase, *string.digits, *string.punctuation]
    vocabulary = [*QFORMER_SPECIAL_TOKENS, *singles, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    if vocab_size < len(vocabulary):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the {len(vocabulary)} special and character tokens")
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    known = set(vocabulary)
    words = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
    return vocabulary + words[: vocab_size - len(vocabulary)]


def build_qformer_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Uncased WordPiece for the Q-Former over :func:`qformer_vocabulary`; encodes ``[CLS] text [SEP]``
    like BERT."""
    vocabulary = {token: i for i, token in enumerate(qformer_vocabulary(texts, vocab_size))}
    tokenizer = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(list(QFORMER_SPECIAL_TOKENS))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", additional_special_tokens=[DEC_TOKEN],
        model_input_names=["input_ids", "attention_mask"],
    )


def build_lm_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE for the language models; encodes ``<s> text`` (the caller appends ``</s>`` to
    targets). Padding side is left, as decoder-only generation wants."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LM_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN], padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
