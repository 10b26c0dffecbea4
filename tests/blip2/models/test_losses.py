"""Stage-1 losses: ITC with multiple positives, hard-negative mining, ITM batch assembly, ITM and ITG
losses, one process without a process group, and a real two-process gloo run against the single-process
loss on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from blip2.models.losses import (
    ItcLoss,
    ItgLoss,
    ItmLoss,
    gather_features,
    identity_positive_mask,
    itm_batch,
    lm_loss,
    positive_mask_from_ids,
    sample_hard_negatives,
)
from tests.ports import free_port

Q, D = 3, 16




def random_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, Q, D)`` image query features and ``(n, D)`` text features, L2-normalised."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, Q, D, generator=generator), dim=-1)
    text = F.normalize(torch.randn(n, D, generator=generator), dim=-1)
    return image, text


def aligned_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`random_features`, but one query of image i equals text i."""
    image, text = random_features(n, seed)
    image = image.clone()
    image[:, 1] = text
    return image, text


def reference_itc(image: torch.Tensor, text: torch.Tensor, temperature, ids: torch.Tensor, rows,
                  label_smoothing: float = 0.1) -> torch.Tensor:
    """ITC written out pair by pair from its definition: the mean over ``rows`` of both directions'
    cross-entropy, over the columns that are not another positive of the row, against (1 - eps) on the
    pair itself + eps spread over those columns."""
    n = len(ids)
    total = 0.0
    for i in rows:
        kept = [j for j in range(n) if j == i or ids[j] != ids[i]]
        target = torch.tensor([label_smoothing / len(kept) + (1 - label_smoothing) * (j == i) for j in kept])
        i2t = torch.stack([(image[i] @ text[j]).max() for j in kept]) / temperature
        t2i = torch.stack([(image[j] @ text[i]).max() for j in kept]) / temperature
        total = total - (target * i2t.log_softmax(0)).sum() / 2 - (target * t2i.log_softmax(0)).sum() / 2
    return total / len(rows)


# --- ITC -----------------------------------------------------------------------------------------------

def test_itc_aligned_batch_has_lower_loss_than_shuffled():
    image, text = aligned_features(8, seed=0)
    loss = ItcLoss()
    aligned = loss(image, text, 0.07).itc_loss
    shuffled = loss(image, text[torch.randperm(8, generator=torch.Generator().manual_seed(1))], 0.07).itc_loss
    assert aligned < shuffled - 1.0


def test_itc_with_one_positive_is_blip2_cross_entropy():
    image, text = random_features(6, seed=2)
    out = ItcLoss()(image, text, 0.1)
    sim = torch.einsum("iqd,jd->ijq", image, text).amax(-1) / 0.1  # (image, text)
    torch.testing.assert_close(out.sim_i2t, sim)
    torch.testing.assert_close(out.sim_t2i, sim.T)
    targets = torch.arange(6)
    expected = (F.cross_entropy(sim, targets, label_smoothing=0.1)
                + F.cross_entropy(sim.T, targets, label_smoothing=0.1)) / 2
    torch.testing.assert_close(out.itc_loss, expected)
    assert torch.equal(out.positive_mask, torch.eye(6, dtype=torch.bool))


def test_itc_with_ids_matches_the_definition_and_mask_input():
    image, text = random_features(8, seed=3)
    ids = torch.tensor([0, 1, 2, 0, 3, 1, 0, 4])
    out = ItcLoss()(image, text, 0.07, ids=ids)
    torch.testing.assert_close(out.itc_loss, reference_itc(image, text, 0.07, ids, range(8)))
    assert torch.equal(out.positive_mask, positive_mask_from_ids(ids, ids))
    from_mask = ItcLoss()(image, text, 0.07, positive_mask=positive_mask_from_ids(ids, ids)).itc_loss
    torch.testing.assert_close(from_mask, out.itc_loss)
    with pytest.raises(ValueError, match="not both"):
        ItcLoss()(image, text, 0.07, ids=ids, positive_mask=out.positive_mask)


def test_itc_does_not_push_duplicate_captions_apart():
    # Pairs 0-2 have one caption (identical text features), each aligned with its own image. Without ids,
    # text 1 is a "negative" of image 0 although it is exactly as right as text 0.
    image, text = aligned_features(8, seed=4)
    image, text = image.clone(), text.clone()
    text[1:3] = text[0]
    image[1:3, 1] = text[0]
    ids = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5])
    image.requires_grad_(), text.requires_grad_()
    loss = ItcLoss()
    with_ids = loss(image, text, 0.07, ids=ids)
    without = loss(image, text, 0.07)
    assert with_ids.itc_loss < without.itc_loss - 0.2
    # The loss does not change with the similarity between a pair and another pair's matching caption /
    # image (so nothing pushes them apart); without ids it rises with it.
    others = positive_mask_from_ids(ids, ids) & ~torch.eye(8, dtype=torch.bool)
    grads = torch.autograd.grad(with_ids.itc_loss, [with_ids.sim_i2t, with_ids.sim_t2i])
    assert all(torch.all(grad[others] == 0) for grad in grads)
    grads = torch.autograd.grad(without.itc_loss, [without.sim_i2t, without.sim_t2i])
    assert all(torch.all(grad[others] > 0) for grad in grads)


def test_itc_trains_the_temperature_and_both_encoders():
    image, text = random_features(4, seed=5)
    image, text = image.requires_grad_(), text.requires_grad_()
    temperature = torch.nn.Parameter(torch.tensor(0.07))
    ItcLoss()(image, text, temperature).itc_loss.backward()
    assert temperature.grad is not None and image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0


def fake_gather(slices: list[torch.Tensor]):
    """A stand-in for :func:`gather_features`: other workers' slices come from ``slices``."""
    def gather(tensor, rank, world_size, with_grad):
        assert len(slices) == world_size
        parts = [s.to(tensor.dtype) for s in slices]
        parts[rank] = tensor
        return torch.cat(parts)
    return gather


def test_a_replaced_gather_lets_one_process_play_two_workers():
    image, text = random_features(8, seed=6)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 4, 5])
    single = ItcLoss()(image, text, 0.07, ids=ids)
    per_rank = []
    for rank in range(2):
        local = slice(4 * rank, 4 * rank + 4)
        gathers = {"image": fake_gather([image[:4], image[4:]]), "text": fake_gather([text[:4], text[4:]]),
                   "ids": fake_gather([ids[:4], ids[4:]])}

        def gather(tensor, rank, world_size, with_grad, gathers=gathers):
            kind = "ids" if tensor.dtype == torch.long else "image" if tensor.dim() == 3 else "text"
            return gathers[kind](tensor, rank, world_size, with_grad)

        out = ItcLoss(rank=rank, world_size=2, gather=gather)(image[local], text[local], 0.07, ids=ids[local])
        torch.testing.assert_close(out.sim_i2t, single.sim_i2t[local])
        torch.testing.assert_close(out.positive_mask, single.positive_mask[local])
        per_rank.append(out.itc_loss)
    torch.testing.assert_close(sum(per_rank) / 2, single.itc_loss)


def test_one_process_never_touches_torch_distributed(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed called in a single process")

    for name in ("all_gather", "all_reduce", "get_rank", "get_world_size"):
        monkeypatch.setattr(dist, name, forbidden)
    assert not dist.is_initialized()
    image, text = random_features(4, seed=7)
    image.requires_grad_()
    for with_grad in (False, True):
        assert gather_features(image, 0, 1, with_grad) is image
    out = ItcLoss(rank=0, world_size=1, gather_with_grad=True)(image, text, 0.07, ids=torch.tensor([0, 0, 1, 2]))
    out.itc_loss.backward()
    sample_hard_negatives(out.sim_i2t, out.sim_t2i, out.positive_mask, rank=0)
    assert not dist.is_initialized()


# --- hard negatives and the ITM batch ------------------------------------------------------------------

def test_hard_negatives_are_never_positives():
    batch, world, rank = 6, 2, 1
    generator = torch.Generator().manual_seed(8)
    ids_all = torch.tensor([0, 1, 0, 2, 1, 3, 0, 0, 1, 4, 2, 5])  # many duplicates, across workers too
    positive_mask = positive_mask_from_ids(ids_all[rank * batch:(rank + 1) * batch], ids_all)  # (6, 12)
    # Positives get the highest similarity: the softmax would favour them if they were not excluded.
    sim_i2t = torch.randn(batch, batch * world, generator=generator) + 20 * positive_mask
    sim_t2i = torch.randn(batch, batch * world, generator=generator) + 20 * positive_mask
    rows = torch.arange(batch)
    drawn_text, drawn_image = set(), set()
    for _ in range(300):
        negative_text, negative_image = sample_hard_negatives(sim_i2t, sim_t2i, positive_mask, rank, generator)
        assert negative_text.shape == negative_image.shape == (batch,)
        assert not positive_mask[rows, negative_text].any() and not positive_mask[rows, negative_image].any()
        drawn_text.update(zip(rows.tolist(), negative_text.tolist()))
        drawn_image.update(zip(rows.tolist(), negative_image.tolist()))
    # Not degenerate: most (row, negative) pairs do get drawn.
    assert len(drawn_text) > 0.6 * (~positive_mask).sum() and len(drawn_image) > 0.6 * (~positive_mask).sum()


def test_hard_negatives_follow_itc_confusion_and_default_to_the_diagonal():
    generator = torch.Generator().manual_seed(9)
    sim = torch.zeros(4, 8)
    sim[:, 2] = 8.0  # one non-positive (a pair of rank 0) that ITC finds very similar to everything
    sim[0, 4] = 50.0  # rank 1, pair 0 itself: never drawn even though it is the most similar
    counts = torch.zeros(8)
    for _ in range(200):
        negative_text, _ = sample_hard_negatives(sim, sim, None, rank=1, generator=generator)
        assert not (negative_text == torch.arange(4) + 4).any()
        counts += torch.bincount(negative_text, minlength=8)
    assert counts[2] > 0.9 * counts.sum()


def test_a_random_share_of_negatives_ignores_itc_but_never_draws_a_positive():
    generator = torch.Generator().manual_seed(11)
    sim = torch.zeros(4, 8)
    sim[:, 2] = 50.0  # ITC alone would draw column 2 every time
    positive_mask = torch.zeros(4, 8, dtype=torch.bool)
    positive_mask[:, 0] = True  # rank 1: the pairs themselves are columns 4..7
    counts = torch.zeros(8)
    for _ in range(300):
        negative_text, _ = sample_hard_negatives(sim, sim, positive_mask, rank=1, generator=generator,
                                                 random_fraction=0.5)
        assert not positive_mask[torch.arange(4), negative_text].any()
        assert not (negative_text == torch.arange(4) + 4).any()
        counts += torch.bincount(negative_text, minlength=8)
    share = counts[2] / counts.sum()  # 0.5 hard + 0.5 * 1/6 uniform over each row's 6 allowed columns
    assert 0.5 < share < 0.7 and counts[0] == 0 and (counts[[1, 3, 4, 5, 6, 7]] > 0).all()
    with pytest.raises(ValueError, match="random_fraction"):
        sample_hard_negatives(sim, sim, None, rank=0, random_fraction=1.5)


def test_a_row_without_any_negative_falls_back_and_is_labelled_positive():
    # A global batch where every pair states one caption: nothing is a negative.
    positive_mask = torch.ones(2, 2, dtype=torch.bool)
    sim = torch.randn(2, 2)
    negative_text, negative_image = sample_hard_negatives(sim, sim, positive_mask, rank=0)
    batch = itm_batch(torch.randn(2, 5, 7), torch.randn(2, 5, 7), torch.ones(2, 3, dtype=torch.long),
                      torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 3), negative_text,
                      negative_image, positive_mask)
    assert batch.labels.tolist() == [1] * 6


def test_itm_batch_layout_labels_and_gradient():
    batch, world, rank = 3, 2, 1
    generator = torch.Generator().manual_seed(10)
    image_all = torch.randn(batch * world, 5, 7, generator=generator, requires_grad=True)  # gathered with grad
    image_local = image_all[rank * batch:(rank + 1) * batch]
    ids_all = torch.randint(1, 50, (batch * world, 4), generator=generator)
    mask_all = torch.ones(batch * world, 4, dtype=torch.long)
    mask_all[:, 3] = 0
    local = slice(rank * batch, (rank + 1) * batch)
    negative_text, negative_image = torch.tensor([0, 5, 1]), torch.tensor([2, 0, 4])
    out = itm_batch(image_local, image_all, ids_all[local], ids_all, mask_all[local], mask_all, negative_text,
                    negative_image, identity_positive_mask(batch, rank, world))
    assert out.image_embeds.shape == (3 * batch, 5, 7)
    assert out.input_ids.shape == out.attention_mask.shape == (3 * batch, 4)
    assert out.labels.tolist() == [1] * batch + [0] * 2 * batch and out.labels.dtype == torch.long
    assert torch.equal(out.input_ids[:batch], ids_all[local])
    assert torch.equal(out.image_embeds[:2 * batch], torch.cat([image_local, image_local]))
    assert torch.equal(out.input_ids[batch:2 * batch], ids_all[negative_text])
    assert torch.equal(out.image_embeds[2 * batch:], image_all[negative_image])
    assert torch.equal(out.input_ids[2 * batch:], ids_all[local])
    # A negative image's ITM loss reaches the worker that owns it (image 0 belongs to rank 0).
    out.image_embeds.sum().backward()
    assert image_all.grad[0].abs().sum() > 0


# --- ITM and ITG ---------------------------------------------------------------------------------------

def test_itm_loss_is_binary_cross_entropy_over_3b_pairs():
    logits = torch.randn(9, 2, generator=torch.Generator().manual_seed(11))
    labels = torch.tensor([1] * 3 + [0] * 6)
    out = ItmLoss()(logits, labels)
    assert out.itm_loss.shape == ()
    torch.testing.assert_close(out.itm_loss, F.cross_entropy(logits, labels))


def test_lm_loss_predicts_the_next_token_and_ignores_minus_100():
    vocab = 10
    labels = torch.tensor([[1, 2, 3, 4, -100, -100], [5, 6, 7, 8, 9, 2]])
    # Logits that put all mass on the *next* label: the loss is the label-smoothing floor.
    next_labels = torch.cat([labels[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1).clamp(min=0)
    shifted = 30.0 * F.one_hot(next_labels, vocab).float()
    unshifted = 30.0 * F.one_hot(labels.clamp(min=0), vocab).float()
    assert lm_loss(shifted, labels) < 0.1 * lm_loss(unshifted, labels)
    expected = F.cross_entropy(shifted[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                               label_smoothing=0.1)
    torch.testing.assert_close(ItgLoss()(shifted, labels).lm_loss, expected)
    # Positions whose next label is -100 (and the last position, which predicts nothing) carry no loss.
    noisy = shifted.clone()
    noisy[0, 3:] = torch.randn(3, vocab)
    noisy[1, 5] = torch.randn(vocab)
    torch.testing.assert_close(lm_loss(noisy, labels), lm_loss(shifted, labels))


def test_lm_loss_without_any_label_is_zero_not_nan():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    loss = ItgLoss()(logits, torch.full((2, 4), -100)).lm_loss
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# --- two real workers ----------------------------------------------------------------------------------

WORLD, LOCAL = 2, 4


def two_worker_run(rank: int, port: int, data: dict, out_dir: str):
    """One gloo worker: ITC on its half of the batch, both gather modes, and a bare gather."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        local = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for with_grad in (False, True):
            image = data["image"][local].clone().requires_grad_()
            text = data["text"][local].clone().requires_grad_()
            temperature = torch.tensor(data["temperature"], requires_grad=True)
            out = ItcLoss(rank, WORLD, gather_with_grad=with_grad)(image, text, temperature, ids=data["ids"][local])
            out.itc_loss.backward()
            results[with_grad] = {"loss": out.itc_loss.detach(), "image_grad": image.grad, "text_grad": text.grad,
                                  "temperature_grad": temperature.grad, "sim_i2t": out.sim_i2t.detach(),
                                  "positive_mask": out.positive_mask}
            x = data["x"][local].clone().requires_grad_()
            gathered = gather_features(x, rank, WORLD, with_grad)
            ((rank + 1) * data["w"] * gathered).sum().backward()  # a different loss on every worker
            results[with_grad].update(gathered=gathered.detach(), x_grad=x.grad)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_workers_match_one_process_on_the_concatenated_batch(tmp_path):
    image, text = random_features(WORLD * LOCAL, seed=12)
    generator = torch.Generator().manual_seed(13)
    data = {"image": image, "text": text, "temperature": 0.07,
            "ids": torch.tensor([0, 1, 2, 0, 3, 1, 4, 5]),  # duplicates within and across workers
            "x": torch.randn(WORLD * LOCAL, 3, generator=generator),
            "w": torch.randn(WORLD * LOCAL, 3, generator=generator)}
    torch.multiprocessing.spawn(two_worker_run, args=(free_port(), data, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    image_single, text_single = image.clone().requires_grad_(), text.clone().requires_grad_()
    temperature_single = torch.tensor(0.07, requires_grad=True)
    single = ItcLoss()(image_single, text_single, temperature_single, ids=data["ids"])
    single.itc_loss.backward()

    for with_grad in (False, True):
        results = [r[with_grad] for r in ranks]
        # The loss averaged over workers is the loss of the whole batch.
        torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, single.itc_loss.detach(),
                                   rtol=0, atol=1e-5)
        # A temperature is used by every term of a worker's loss, so averaging its gradient over workers
        # (what DDP does) gives the exact gradient in either gather mode.
        torch.testing.assert_close(sum(r["temperature_grad"] for r in results) / WORLD, temperature_single.grad,
                                   rtol=0, atol=1e-5)
        for rank, result in enumerate(results):
            local = slice(rank * LOCAL, (rank + 1) * LOCAL)
            torch.testing.assert_close(result["sim_i2t"], single.sim_i2t[local].detach(), rtol=0, atol=1e-5)
            assert torch.equal(result["positive_mask"], single.positive_mask[local])
            # Gathered values are the concatenation in rank order.
            torch.testing.assert_close(result["gathered"], data["x"])

    for rank in range(WORLD):
        local = slice(rank * LOCAL, (rank + 1) * LOCAL)
        # with_grad=True: each worker's features receive the gradient of every worker's loss, summed, so
        # divided by the world size (DDP's average) it is the single-process gradient exactly.
        exact = ranks[rank][True]
        torch.testing.assert_close(exact["image_grad"] / WORLD, image_single.grad[local], rtol=0, atol=1e-5)
        torch.testing.assert_close(exact["text_grad"] / WORLD, text_single.grad[local], rtol=0, atol=1e-5)
        torch.testing.assert_close(exact["x_grad"], sum(s + 1 for s in range(WORLD)) * data["w"][local])

        # with_grad=False (BLIP-2's ITC): other workers' features are constants, so a worker's features
        # get only the gradient of its own rows; the terms where they appear as another worker's columns
        # are dropped by design. What is guaranteed is the gradient of this worker's rows with every
        # other slice held constant, written here from the definition.
        cheap = ranks[rank][False]
        image_ref, text_ref = image.clone(), text.clone()
        image_local, text_local = image[local].clone().requires_grad_(), text[local].clone().requires_grad_()
        image_ref[local], text_ref[local] = image_local, text_local
        reference_itc(image_ref, text_ref, 0.07, data["ids"], range(rank * LOCAL, (rank + 1) * LOCAL)).backward()
        torch.testing.assert_close(cheap["image_grad"], image_local.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(cheap["text_grad"], text_local.grad, rtol=0, atol=1e-5)
        assert (cheap["image_grad"] - exact["image_grad"]).abs().amax() > 1e-3  # the dropped terms are real
        torch.testing.assert_close(cheap["x_grad"], (rank + 1) * data["w"][local])
