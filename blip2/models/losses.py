"""Stage-1 objectives of BLIP-2: image-text contrastive (ITC), image-text matching (ITM) with hard
negatives mined from ITC, and image-grounded text generation (ITG).

Distributed context is passed in, never read from globals: every loss takes ``rank`` and ``world_size``,
and the cross-worker gather is :func:`gather_features`, a plain function that a loss receives as an
argument so that a test can replace it. With ``world_size == 1`` nothing here touches
``torch.distributed``, so one process needs no process group.

Shapes: ``B`` is the local batch size (the same on every worker: gathers need equal shapes, so drop the
last partial batch), ``N = world_size * B`` the global batch, ``Q`` the number of queries, ``D`` the ITC
embedding size. Column ``rank * B + i`` of any ``(B, N)`` matrix is local pair ``i``.

Multiple positives. In the toy world (as with COCO's five captions per image) many pairs in a batch
share a caption, so "pair j is a negative for pair i unless j == i" is false. Pairs carry ``ids`` (an
image id, or an id of what the caption states): pairs with equal ids are positives of each other. In ITC,
a pair's target stays the pair itself and its *other* positives leave the softmax: they are neither
pushed away as negatives nor pulled in as targets. (Spreading the target uniformly over the positives,
as ALBEF/BLIP retrieval fine-tuning does with image ids, changes nothing when captions are exactly
identical: their logits are then equal, and that loss equals the id-blind one, value and gradient.) The
ITM sampler likewise never draws a positive as a "negative".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

GatherFn = Callable[[Tensor, int, int, bool], Tensor]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each worker the gradient of every worker's loss with
    respect to its own slice, summed.

    Written here rather than taken from ``torch.distributed.nn.functional.all_gather`` (deprecated in
    torch 2.x): on gloo in torch 2.13 that one's backward copies the raw memory of a non-contiguous
    incoming gradient (``einsum``'s backward produces one) into a buffer with the same strides, which
    returns the gradient transposed. Here the gradient is made contiguous before any collective.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank, ctx.world_size = rank, world_size
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor)
        return torch.cat(gathered, dim=0)  # (world_size * B, ...)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every worker holds d(its loss)/d(all slices); summing over workers and keeping our slice is
        # d(sum of losses)/d(our features). A copy, because all_reduce works in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        local = grad.shape[0] // ctx.world_size
        return grad[ctx.rank * local:(ctx.rank + 1) * local], None, None


def gather_features(tensor: Tensor, rank: int, world_size: int, with_grad: bool) -> Tensor:
    """Concatenate ``tensor`` from every worker along dim 0, in rank order.

    Args:
        tensor: ``(B, ...)``, the same shape on every worker.
        rank, world_size: this worker's place; ``world_size == 1`` returns ``tensor`` itself and makes no
            ``torch.distributed`` call.
        with_grad: False: other workers' slices are constants and the local slice is ``tensor`` itself,
            so gradient flows into the local features only through the local slice (what BLIP-2 does
            for ITC). True: gradient flows back to every worker's features, summed over all workers'
            losses (what BLIP-2 does for the image embeddings of ITM negatives); every worker must then
            call ``backward``, since the backward pass is itself a collective.

    Returns:
        ``(world_size * B, ...)``.
    """
    if world_size == 1:
        return tensor
    if with_grad:
        return _AllGatherWithGrad.apply(tensor, rank, world_size)
    gathered = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    gathered[rank] = tensor  # all_gather's copy has no graph; put the local one back
    return torch.cat(gathered, dim=0)


def positive_mask_from_ids(ids: Tensor, ids_all: Tensor) -> Tensor:
    """``(B,)`` local ids and ``(N,)`` gathered ids -> ``(B, N)`` bool, True where pair ids are equal."""
    return ids[:, None] == ids_all[None, :]


def identity_positive_mask(batch_size: int, rank: int, world_size: int, device=None) -> Tensor:
    """``(B, N)`` bool with only each local pair itself (column ``rank * B + i``) as positive."""
    mask = torch.zeros(batch_size, world_size * batch_size, dtype=torch.bool, device=device)
    local = torch.arange(batch_size, device=device)
    mask[local, rank * batch_size + local] = True
    return mask


@dataclass
class ItcOutput:
    """ITC loss and what ITM's hard-negative mining reuses.

    ``sim_i2t`` (B, N): local images against all texts; ``sim_t2i`` (B, N): local texts against all
    images; both are max over queries divided by the temperature (the loss's logits before a row's
    other positives are left out).
    ``positive_mask`` (B, N): True where local pair ``i`` and global pair ``j`` match.
    """

    itc_loss: Tensor
    sim_i2t: Tensor
    sim_t2i: Tensor
    positive_mask: Tensor


class ItcLoss(nn.Module):
    """Image-text contrastive loss over the global batch, with multiple positives and label smoothing.

    Each local image is scored against every text of every worker, and each local text against every
    image; the loss is cross-entropy in both directions, averaged. A pair's other positives are left out
    of its softmax (see the module docstring); with none, this is exactly BLIP-2's loss. Averaged over
    workers it equals the single-process loss on the concatenated batch.

    Args:
        rank, world_size: this worker's place in the data-parallel group.
        label_smoothing: BLIP-2 uses 0.1; spread over the columns left in the softmax.
        gather_with_grad: False (BLIP-2): other workers' features are constants, so each worker's
            features get the gradient of that worker's rows only (cheaper; the cross terms through other
            workers' columns are dropped). True: each worker's features get the gradient of every
            worker's loss, summed, so that DDP's gradient average is exactly the global loss's gradient.
        gather: the cross-worker gather, replaceable in tests.
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, label_smoothing: float = 0.1, gather_with_grad: bool = False,
        gather: GatherFn = gather_features,
    ):
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.label_smoothing = label_smoothing
        self.gather_with_grad = gather_with_grad
        self.gather = gather

    def forward(
        self, image_feats: Tensor, text_feat: Tensor, temperature: Tensor | float, ids: Tensor | None = None,
        positive_mask: Tensor | None = None,
    ) -> ItcOutput:
        """Score and compare.

        Args:
            image_feats: ``(B, Q, D)`` L2-normalised query outputs (image side).
            text_feat: ``(B, D)`` L2-normalised text ``[CLS]`` output.
            temperature: the model's learnable temperature (BLIP-2 starts at 0.07 and clamps it); a
                tensor keeps it trainable.
            ids: ``(B,)`` integer pair ids; equal ids are positives (gathered across workers here).
            positive_mask: ``(B, N)`` bool, instead of ``ids``: which global pairs match each local
                pair, a relation used in both directions. Neither: each pair is its own only positive.
                Each pair is always a positive of itself, whatever is passed.
        """
        if ids is not None and positive_mask is not None:
            raise ValueError("pass ids or positive_mask, not both")
        batch_size = image_feats.shape[0]
        image_all = self.gather(image_feats, self.rank, self.world_size, self.gather_with_grad)  # (N, Q, D)
        text_all = self.gather(text_feat, self.rank, self.world_size, self.gather_with_grad)  # (N, D)

        # A pair's similarity is its best query: different queries specialise in different aspects.
        sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, text_all).amax(dim=-1) / temperature  # (B, N)
        sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_all).amax(dim=-1) / temperature  # (B, N)

        identity = identity_positive_mask(batch_size, self.rank, self.world_size, device=sim_i2t.device)
        if ids is not None:
            ids_all = self.gather(ids, self.rank, self.world_size, False)  # (N,)
            positive_mask = positive_mask_from_ids(ids, ids_all)
        positive_mask = identity if positive_mask is None else positive_mask.to(identity.device) | identity

        others = positive_mask & ~identity  # (B, N): matching pairs that are not the pair itself
        target = torch.arange(batch_size, device=sim_i2t.device) + self.rank * batch_size  # (B,)
        itc_loss = (
            contrastive_cross_entropy(sim_i2t, target, others, self.label_smoothing)
            + contrastive_cross_entropy(sim_t2i, target, others, self.label_smoothing)
        ) / 2
        return ItcOutput(itc_loss=itc_loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i, positive_mask=positive_mask)


def contrastive_cross_entropy(logits: Tensor, target: Tensor, left_out: Tensor, label_smoothing: float) -> Tensor:
    """Cross-entropy over the columns that are not ``left_out``, with label smoothing over those columns.

    Args:
        logits: ``(B, N)``.
        target: ``(B,)`` the column of each row's own positive (never left out).
        left_out: ``(B, N)`` bool, columns removed from a row's softmax.
        label_smoothing: ``eps``; the target is ``(1 - eps)`` on ``target`` plus ``eps`` spread evenly over
            the remaining columns, so with nothing left out this is ``F.cross_entropy(logits, target,
            label_smoothing=eps)``.

    Returns:
        Scalar mean over rows.
    """
    log_probs = logits.masked_fill(left_out, float("-inf")).log_softmax(dim=1)  # (B, N)
    # 0 rather than -inf at left-out columns: their target weight is 0, and 0 * -inf would be NaN.
    log_probs = log_probs.masked_fill(left_out, 0.0)
    kept = (~left_out).to(logits.dtype)
    smoothing = label_smoothing * kept / kept.sum(dim=1, keepdim=True)  # (B, N)
    target_log_prob = log_probs.gather(1, target[:, None]).squeeze(1)  # (B,)
    return -((1 - label_smoothing) * target_log_prob + (smoothing * log_probs).sum(dim=1)).mean()


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor, sim_t2i: Tensor, positive_mask: Tensor | None, rank: int,
    generator: torch.Generator | None = None, random_fraction: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative text per local image and one hard negative image per local text.

    Negatives are drawn over the global batch with probability ``softmax(sim)`` restricted to
    non-positives: the more ITC confuses a pair, the likelier ITM is to see it.

    Args:
        sim_i2t, sim_t2i: ``(B, N)`` ITC logits (``ItcOutput``); no gradient flows through sampling.
        positive_mask: ``(B, N)`` bool, pairs that must never be drawn; None: each local pair itself
            (column ``rank * B + i``). Each pair itself is excluded either way.
        rank: this worker's rank, to locate the local pairs among the columns.
        generator: for reproducible draws (on the device of the similarities).
        random_fraction: ``r`` in [0, 1]: draw from ``(1 - r) * softmax(sim) + r * uniform`` over the
            non-positives, i.e. a share ``r`` of the negatives is random rather than hard. 0 is BLIP-2's
            sampler; a share of easy negatives keeps ITM learning what a plain mismatch looks like while
            ITC makes its hard negatives ever harder.

    Returns:
        ``(negative_text_index, negative_image_index)``, each ``(B,)`` long, indices into the global
        batch. A row whose every column is a positive (a whole global batch stating one caption) has no
        negative: it draws from the softmax over all columns instead, and :func:`itm_batch` labels such a
        pair 1.
    """
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
    batch_size, global_size = sim_i2t.shape
    world_size = global_size // batch_size
    excluded = identity_positive_mask(batch_size, rank, world_size, device=sim_i2t.device)
    if positive_mask is not None:
        excluded = excluded | positive_mask.to(excluded.device)
    # No negative at all: let every column through rather than sample from an all-zero row.
    excluded = excluded & ~excluded.all(dim=1, keepdim=True)

    def draw(sim: Tensor) -> Tensor:
        # Masking logits before the softmax (not zeroing probabilities after it) keeps the weights finite
        # even when every non-positive is far below the positives, which a sharp temperature makes common.
        weights = torch.softmax(sim.detach().float().masked_fill(excluded, float("-inf")), dim=1)  # (B, N)
        if random_fraction > 0:
            allowed = (~excluded).float()
            weights = (1 - random_fraction) * weights + random_fraction * allowed / allowed.sum(dim=1, keepdim=True)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)

    return draw(sim_i2t), draw(sim_t2i)


@dataclass
class ItmBatch:
    """Image-text pairs for the ITM forward: ``3B`` rows in the order positives (image i, text i),
    negative texts (image i, text ``negative_text_index[i]``), negative images
    (image ``negative_image_index[i]``, text i).

    ``image_embeds`` (3B, P, C), ``input_ids`` (3B, T), ``attention_mask`` (3B, T), ``labels`` (3B,) long.
    """

    image_embeds: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def itm_batch(
    image_embeds: Tensor, image_embeds_all: Tensor, input_ids: Tensor, input_ids_all: Tensor,
    attention_mask: Tensor, attention_mask_all: Tensor, negative_text_index: Tensor,
    negative_image_index: Tensor, positive_mask: Tensor | None = None,
) -> ItmBatch:
    """Assemble positives and the sampled hard negatives into one ITM batch.

    Args:
        image_embeds: ``(B, P, C)`` local vision-encoder outputs (the Q-Former's cross-attention input).
        image_embeds_all: ``(N, P, C)`` the same gathered ``with_grad=True``, so that a negative image's
            ITM loss trains the worker that owns it.
        input_ids, attention_mask: ``(B, T)`` local text, padded to one ``T`` on every worker.
        input_ids_all, attention_mask_all: ``(N, T)`` gathered without gradient (integers).
        negative_text_index, negative_image_index: ``(B,)`` from :func:`sample_hard_negatives`.
        positive_mask: ``(B, N)``, as given to the sampler; labels are read from it, so that the rare
            fallback pair that is in fact a positive is labelled 1. None: labels are ``[1]*B + [0]*2B``.

    Returns:
        An :class:`ItmBatch` of ``3B`` rows.
    """
    batch_size = image_embeds.shape[0]
    labels = torch.cat(
        [torch.ones(batch_size, dtype=torch.long), torch.zeros(2 * batch_size, dtype=torch.long)]
    ).to(input_ids.device)
    if positive_mask is not None:
        local = torch.arange(batch_size, device=positive_mask.device)
        labels[batch_size:2 * batch_size] = positive_mask[local, negative_text_index].long()
        labels[2 * batch_size:] = positive_mask[local, negative_image_index].long()
    return ItmBatch(
        image_embeds=torch.cat([image_embeds, image_embeds, image_embeds_all[negative_image_index]], dim=0),
        input_ids=torch.cat([input_ids, input_ids_all[negative_text_index], input_ids], dim=0),
        attention_mask=torch.cat(
            [attention_mask, attention_mask_all[negative_text_index], attention_mask], dim=0
        ),
        labels=labels,
    )


@dataclass
class ItmOutput:
    itm_loss: Tensor


class ItmLoss(nn.Module):
    """Binary matched / not-matched cross-entropy on the ITM head's logits.

    BLIP-2 applies the ITM head to every query output (ITM mask: queries see the text) and averages the
    logits over queries before this loss; that happens in the model.
    """

    def forward(self, logits: Tensor, labels: Tensor) -> ItmOutput:
        """``logits`` (3B, 2), ``labels`` (3B,) long in {0, 1} -> mean cross-entropy."""
        return ItmOutput(itm_loss=F.cross_entropy(logits, labels))


@dataclass
class ItgOutput:
    lm_loss: Tensor


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy: the logits at position t predict the label at t + 1.

    Args:
        logits: ``(B, T, V)`` over the text positions.
        labels: ``(B, T)`` the input ids, with ``ignore_index`` at padding (and wherever no loss is wanted).
        label_smoothing: BLIP-2 uses 0.1.

    Returns:
        Scalar mean over the non-ignored predicted tokens; 0 (not NaN) when every label is ignored.
    """
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])  # (B * (T - 1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B * (T - 1),)
    total = F.cross_entropy(
        shifted_logits, shifted_labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction="sum",
    )
    # Summed then divided ourselves: "mean" divides by zero when a batch has no label to predict.
    count = (shifted_labels != ignore_index).sum().clamp(min=1)
    return total / count


class ItgLoss(nn.Module):
    """Image-grounded text generation loss (the Q-Former's LM objective, under the ITG mask)."""

    def __init__(self, label_smoothing: float = 0.1, ignore_index: int = -100):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, labels: Tensor) -> ItgOutput:
        """``logits`` (B, T, V), ``labels`` (B, T) -> :class:`ItgOutput` (see :func:`lm_loss`)."""
        return ItgOutput(lm_loss=lm_loss(logits, labels, self.label_smoothing, self.ignore_index))
