import pytest
import torch
from torch import nn

from blip2.training.optim import build_optimizer, build_scheduler, parameter_groups
from blip2.training.state import TrainingProgress, load_training_state, save_training_state


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.body = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.norm(self.body(self.frozen(x)))) / self.temp


def run(model, optimizer, scheduler, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        loss = nn.functional.cross_entropy(model(x), (x.sum(1) > 0).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def fresh(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = build_optimizer(model, 1e-2)
    return model, optimizer, build_scheduler(optimizer, warmup_steps=3, total_steps=20)


def test_decay_only_on_matrices_and_never_on_frozen_parameters():
    model = Tiny()
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.body.weight), id(model.head.weight)}
    assert id(model.temp) in {id(p) for p in no_decay["params"]}
    assert id(model.frozen.weight) not in {id(p) for g in (decay, no_decay) for p in g["params"]}


def test_schedule_warms_up_then_decays_to_zero():
    _, optimizer, scheduler = fresh()
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and rates[1] < rates[2] < rates[3] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(rates[3:], rates[4:])) and optimizer.param_groups[0]["lr"] == 0


def test_resumed_run_continues_exactly(tmp_path):
    """Train 5 steps, checkpoint, train 5 more; a fresh process restoring the checkpoint and training the
    same 5 steps ends bit-identical."""
    model, optimizer, scheduler = fresh()
    run(model, optimizer, scheduler, 5, seed=1)
    save_training_state(tmp_path / "ckpt", model, optimizer, scheduler, TrainingProgress(step=5, batch_in_epoch=5))
    run(model, optimizer, scheduler, 5, seed=2)

    resumed, resumed_optimizer, resumed_scheduler = fresh()  # frozen weights: reloaded as from a backbone
    with torch.no_grad():  # trainable weights: spoiled, so only the checkpoint can bring them back
        for parameter in resumed.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    progress = load_training_state(tmp_path / "ckpt", resumed, resumed_optimizer, resumed_scheduler)
    assert progress == TrainingProgress(step=5, batch_in_epoch=5)
    run(resumed, resumed_optimizer, resumed_scheduler, 5, seed=2)
    for (name, ours), theirs in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    model, optimizer, scheduler = fresh()
    run(model, optimizer, scheduler, 1, seed=0)
    directory = save_training_state(tmp_path / "c", model, optimizer, scheduler, TrainingProgress(step=1))
    assert sorted(p.name for p in directory.iterdir()) == ["optimizer.safetensors", "state.json",
                                                           "trainable.safetensors"]
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        load_training_state(tmp_path, model, optimizer, scheduler)
