"""The three Q-Former masks: their pattern, and the information flow they allow, proven by perturbing the
inputs of a real tiny ``Blip2QFormerModel`` (text via ``Blip2TextEmbeddings``) under eager and SDPA
attention."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from blip2.models.masks import MASK_KINDS, qformer_attention_allowed, qformer_attention_mask

Q, T, B, VOCAB, IMAGE_TOKENS = 3, 5, 2, 100, 7
IMPLEMENTATIONS = ("eager", "sdpa")


def tiny_config(attn_implementation: str) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, encoder_hidden_size=32,
        vocab_size=VOCAB, use_qformer_text_input=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        cross_attention_frequency=1, attn_implementation=attn_implementation,
        # Larger than the default 0.02 so that the image's effect on text, two attention hops away, is
        # far above float noise.
        initializer_range=0.1,
    )


class TinyQFormer:
    """Query tokens + text embeddings + Q-Former, wired the way BLIP-2 wires them."""

    def __init__(self, attn_implementation: str):
        torch.manual_seed(0)  # the same weights for every implementation
        config = tiny_config(attn_implementation)
        self.qformer = Blip2QFormerModel(config).eval()
        self.embeddings = Blip2TextEmbeddings(config).eval()
        self.query_tokens = torch.randn(1, Q, config.hidden_size)
        assert self.qformer.config._attn_implementation == attn_implementation

    @torch.no_grad()
    def __call__(self, kind: str, input_ids: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor):
        """(B, T) ids and mask, (B, P, C) image -> (B, Q + T, H) hidden states."""
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q + T, H)
        return self.qformer(
            query_embeds=embeds, query_length=Q, attention_mask=qformer_attention_mask(kind, Q, text_mask),
            encoder_hidden_states=image,
        ).last_hidden_state




@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def model(request):
    return TinyQFormer(request.param)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (B, T), generator=generator)
    text_mask = torch.ones(B, T, dtype=torch.long)
    image = torch.randn(B, IMAGE_TOKENS, 32, generator=generator)
    return input_ids, text_mask, image


def changed_token(input_ids: torch.Tensor, position: int) -> torch.Tensor:
    changed = input_ids.clone()
    changed[:, position] = changed[:, position] % (VOCAB - 1) + 1  # another real token, never the pad id 0
    return changed


def other_image_like(image: torch.Tensor) -> torch.Tensor:
    return torch.randn(image.shape, generator=torch.Generator().manual_seed(9))


def assert_same(a: torch.Tensor, b: torch.Tensor):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def assert_differs(a: torch.Tensor, b: torch.Tensor):
    assert (a - b).abs().amax() > 1e-3  # three orders of magnitude above what assert_same tolerates


# --- the pattern itself ---------------------------------------------------------------------------------

def test_patterns_on_a_small_example():
    text_mask = torch.tensor([[1, 1, 1]])
    expected = {
        "itc": [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1]],
        "itm": [[1] * 5] * 5,
        "itg": [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 1, 1, 1]],
    }
    for kind, rows in expected.items():
        assert qformer_attention_allowed(kind, 2, text_mask)[0].tolist() == [[bool(v) for v in r] for r in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_shape_dtype_and_values(kind, dtype):
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    mask = qformer_attention_mask(kind, Q, text_mask, dtype=dtype)
    assert mask.shape == (2, 1, Q + 4, Q + 4) and mask.dtype == dtype
    allowed = qformer_attention_allowed(kind, Q, text_mask)[:, None]
    assert torch.equal(mask == 0, allowed)
    assert torch.all(mask[~allowed] == torch.finfo(dtype).min)


def test_queries_alone_text_alone_and_bad_arguments():
    assert torch.equal(qformer_attention_mask("itc", Q, torch.ones(B, 0)), torch.zeros(B, 1, Q, Q))
    # Text alone (ITC's text branch, query_length=0): bidirectional over the real tokens.
    text_mask = torch.tensor([[1, 1, 0]])
    assert qformer_attention_allowed("itc", 0, text_mask)[0].tolist() == [
        [True, True, False], [True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="kind"):
        qformer_attention_mask("itx", Q, torch.ones(B, T))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        qformer_attention_mask("itc", Q, torch.ones(B, 1, T))
    with pytest.raises(ValueError, match="floating"):
        qformer_attention_mask("itc", Q, torch.ones(B, T), dtype=torch.long)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_padding_keys_are_hidden_from_every_other_row_and_no_row_is_empty(kind):
    text_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    allowed = qformer_attention_allowed(kind, Q, text_mask)  # (B, L, L)
    padded_keys = torch.cat([torch.zeros(2, Q, dtype=torch.bool), text_mask == 0], dim=1)  # (B, L)
    off_diagonal = ~torch.eye(Q + 4, dtype=torch.bool)
    assert not (allowed & padded_keys[:, None, :] & off_diagonal).any()
    assert allowed.any(dim=-1).all()


# --- information flow through a real Q-Former ----------------------------------------------------------

def test_itc_text_cannot_reach_queries_and_image_cannot_reach_text(model, inputs):
    input_ids, text_mask, image = inputs
    base = model("itc", input_ids, text_mask, image)
    other_text = model("itc", changed_token(input_ids, 1), text_mask, image)
    assert_same(base[:, :Q], other_text[:, :Q])
    assert_differs(base[:, Q:], other_text[:, Q:])  # the perturbation is real
    other_image = model("itc", input_ids, text_mask, other_image_like(image))
    assert_same(base[:, Q:], other_image[:, Q:])
    assert_differs(base[:, :Q], other_image[:, :Q])


def test_itm_queries_see_the_text_and_text_sees_the_image(model, inputs):
    input_ids, text_mask, image = inputs
    base = model("itm", input_ids, text_mask, image)
    assert_differs(base[:, :Q], model("itm", changed_token(input_ids, T - 1), text_mask, image)[:, :Q])
    assert_differs(base[:, Q:], model("itm", input_ids, text_mask, other_image_like(image))[:, Q:])


def test_itg_is_causal_over_text_and_queries_never_see_text(model, inputs):
    input_ids, text_mask, image = inputs
    base = model("itg", input_ids, text_mask, image)
    k = 2
    later = model("itg", changed_token(input_ids, k), text_mask, image)
    assert_same(base[:, :Q + k], later[:, :Q + k])  # queries and text tokens before k
    assert_differs(base[:, Q + k:], later[:, Q + k:])
    # Every text token sees the image (through the queries), so captions are image-grounded.
    other_image = model("itg", input_ids, text_mask, other_image_like(image))
    for position in range(Q, Q + T):
        assert_differs(base[:, position], other_image[:, position])


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_padded_tokens_change_no_real_output_and_produce_no_nan(model, kind):
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, VOCAB, (3, T), generator=generator)
    # Right padding, and a text that is all padding (its rows would be empty under ITC without the
    # self-attention exception).
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    image = torch.randn(3, IMAGE_TOKENS, 32, generator=generator)
    base = model(kind, input_ids, text_mask, image)
    assert torch.isfinite(base).all()
    noisy_padding = torch.where(text_mask.bool(), input_ids, torch.randint(1, VOCAB, (3, T), generator=generator))
    other = model(kind, noisy_padding, text_mask, image)
    real = torch.cat([torch.ones(3, Q, dtype=torch.bool), text_mask.bool()], dim=1)  # (B, L)
    assert_same(base[real], other[real])


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_eager_and_sdpa_agree(kind, inputs):
    input_ids, _, image = inputs
    text_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    eager, sdpa = (TinyQFormer(impl)(kind, input_ids, text_mask, image) for impl in IMPLEMENTATIONS)
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
