"""The Q-Former's three self-attention masks, one per stage-1 objective.

BLIP-2 trains one Q-Former on three objectives that share its weights and differ only in who may attend
to whom in self-attention. The sequence is always ``[queries; text]`` (``Q`` learned query tokens, then
``T`` text tokens), which is what ``Blip2TextEmbeddings(input_ids=, query_embeds=)`` builds, and the image
reaches the sequence only through cross-attention, which ``Blip2QFormerModel`` runs on the first
``query_length`` positions alone. So the mask alone decides how image information can flow:

- ``"itc"`` (uni-modal, image-text contrastive): queries see queries, text sees text. Query outputs carry
  the image and nothing of the text; text outputs carry the text and nothing of the image, so the two
  can be compared without leaking the answer.
- ``"itm"`` (bi-directional, image-text matching): every position sees every position. Query outputs
  fuse image and text, and the ITM head classifies them.
- ``"itg"`` (multimodal causal, image-grounded text generation): queries see queries only (they must not
  peek at the caption they help to generate); text token ``i`` sees all queries and text tokens
  ``j <= i``.

Padding. A padded text position is never a key for any other position, in any mask. Its own row would
then be empty where the mode allows it only text (``"itc"`` with an all-padding text, for instance), and
an empty row is a softmax over nothing: with ``-inf`` it is NaN, which then poisons gradients through
``0 * NaN``. So every position may always attend to itself. This changes no output at a real position
(a padded key is still hidden from every row but its own), the padded outputs it produces are
meaningless and ignored by every loss, and no row is ever empty.

The masks are *additive* floats of shape ``(B, 1, L, L)``, 0 where attention is allowed and
``torch.finfo(dtype).min`` where it is not, because in transformers 5.24 that is the one form that is
right with every attention implementation: a 3D mask raises inside ``Blip2QFormerModel``, and eager
attention adds a boolean 4D mask to the scores as 0/1 instead of masking with it (silently wrong).
``finfo.min`` rather than ``-inf`` keeps a row finite even if a caller's mask ends up empty.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MaskKind = Literal["itc", "itm", "itg"]
MASK_KINDS: tuple[str, ...] = ("itc", "itm", "itg")


def qformer_attention_allowed(kind: MaskKind, query_length: int, text_attention_mask: Tensor) -> Tensor:
    """Which key each position of ``[queries; text]`` may attend to, as booleans.

    Args:
        kind: ``"itc"``, ``"itm"`` or ``"itg"`` (see the module docstring).
        query_length: ``Q``, the number of query tokens in front of the text.
        text_attention_mask: ``(B, T)``, 1 (or True) at real text tokens, 0 at padding.

    Returns:
        ``(B, Q + T, Q + T)`` bool, ``[b, i, j]`` True where position ``i`` may attend to key ``j``.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    if text_attention_mask.dim() != 2:
        raise ValueError(f"text_attention_mask must be (B, T), got shape {tuple(text_attention_mask.shape)}")
    if query_length < 0:
        raise ValueError(f"query_length must be >= 0, got {query_length}")
    batch_size, text_length = text_attention_mask.shape
    length = query_length + text_length
    device = text_attention_mask.device

    position = torch.arange(length, device=device)
    is_query = position < query_length  # (L,)
    if kind == "itm":
        pattern = torch.ones(length, length, dtype=torch.bool, device=device)
    elif kind == "itc":
        pattern = is_query[:, None] == is_query[None, :]
    else:
        # Every row gets every query key; on top of that, row i gets keys j <= i. For a query row those
        # are queries already, so queries never see text, and a text row i gets text keys j <= i.
        causal = position[None, :] <= position[:, None]
        pattern = causal | is_query[None, :]
    # (L, L)

    key_is_real = torch.cat(
        [torch.ones(batch_size, query_length, dtype=torch.bool, device=device), text_attention_mask.bool()], dim=1
    )  # (B, L)
    allowed = pattern[None, :, :] & key_is_real[:, None, :]  # (B, L, L)
    # Every position sees itself, so that no row is empty (see "Padding" in the module docstring).
    return allowed | torch.eye(length, dtype=torch.bool, device=device)[None, :, :]


def qformer_attention_mask(
    kind: MaskKind, query_length: int, text_attention_mask: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The additive self-attention mask that ``Blip2QFormerModel(attention_mask=...)`` takes.

    Args:
        kind: ``"itc"``, ``"itm"`` or ``"itg"`` (see the module docstring).
        query_length: ``Q``, the number of query tokens in front of the text.
        text_attention_mask: ``(B, T)``, 1 (or True) at real text tokens, 0 at padding. ``T`` may be 0
            (queries alone).
        dtype: floating dtype of the mask; the Q-Former runs in fp32, so the default rarely changes.

    Returns:
        ``(B, 1, Q + T, Q + T)`` of ``dtype`` on the text mask's device: 0 where attention is allowed,
        ``torch.finfo(dtype).min`` where it is not; the singleton dimension broadcasts over heads.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"an additive mask needs a floating dtype, got {dtype}")
    allowed = qformer_attention_allowed(kind, query_length, text_attention_mask)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None, :, :]
