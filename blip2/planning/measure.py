"""Run one training or inference step on fake tensors: FLOPs counted, memory traced, nothing computed.

A model built on the meta device is given fake parameters (``FakeTensorMode``: shapes, dtypes and
devices, no storage), and the real step (the project's own stage-1 objective, transformers' BLIP-2 and
InstructBLIP forwards) runs on them. Two dispatch modes watch every aten op:

- ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of matmuls, convolutions and attention,
  forward and backward;
- :class:`MemoryTracker` sums the bytes of every tensor storage an op creates and subtracts them when the
  storage is freed, keeping the peak: activations saved for backward, temporaries, gradients. It sees
  what the step allocates, not what a CUDA caching allocator rounds or fragments (that margin is
  :data:`blip2.planning.plan.ALLOCATOR_HEADROOM`), and not the parameters made before it started,
  which :mod:`blip2.planning.plan` adds by arithmetic.

Why fake tensors rather than the meta device: transformers skips its data-dependent checks (``mask.all()``,
counting image tokens) for fake tensors, which meta tensors cannot answer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


class MemoryTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created by ops run inside it, and their peak.

    Lifetimes follow the tensors, whose Python objects live exactly as long as their C++ tensors (autograd's
    saved tensors included): a storage (keyed by its C++ address) is counted when the first tensor on it
    appears and uncounted when the last one is freed (weakref finalizers), however many views share it.
    Storages of ``existing`` tensors (the weights) are never counted. ``peak_without(storages)`` takes
    storages out of the peak afterwards, e.g. parameter gradients that the caller accounts for itself."""

    def __init__(self, existing: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self._keep = list(existing)  # the weights outlive the trace, so their addresses are never reused
        self.live = 0
        self.peak = 0
        self._tensors: set[int] = set()  # id() of tracked tensors alive now
        self._views: dict[int, int] = {}  # storage address -> tracked tensors alive on it
        self._sizes: dict[int, int] = {}  # storage address -> bytes
        self._serials: dict[int, int] = {}  # storage address -> allocation number (addresses get reused)
        self._events: list[tuple[int, int]] = []  # (allocation number, +bytes / -bytes) in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        if id(tensor) in self._tensors:  # an in-place op returns its input
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._existing:
            return
        self._tensors.add(id(tensor))
        if key not in self._views:
            self._views[key] = 0
            self._sizes[key] = size = storage.nbytes()
            self._serials[key] = len(self._events)
            self._events.append((self._serials[key], size))
            self.live += size
            self.peak = max(self.peak, self.live)
        self._views[key] += 1
        weakref.finalize(tensor, self._release, id(tensor), key)

    def _release(self, tensor_id: int, key: int) -> None:
        self._tensors.discard(tensor_id)
        self._views[key] -= 1
        if self._views[key] == 0:
            del self._views[key]
            size = self._sizes.pop(key)
            self._events.append((self._serials.pop(key), -size))
            self.live -= size

    def peak_without(self, storages: list[torch.UntypedStorage]) -> int:
        """The peak had ``storages`` (still alive) never been counted."""
        skip = {self._serials[s._cdata] for s in storages if s._cdata in self._serials}
        live = peak = 0
        for serial, delta in self._events:
            if serial not in skip:
                live += delta
                peak = max(peak, live)
        return peak


def to_fake(model: nn.Module, mode: FakeTensorMode, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every (meta) parameter and buffer of ``model`` by a fake CPU tensor of the same shape and
    ``requires_grad`` (floating-point ones in ``dtype``, when given), in place; a tensor shared by two
    modules (tied weights) stays shared."""
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=dtype if dtype and t.is_floating_point() else t.dtype, device="cpu")
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    with mode:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None:
                        table[name] = fake(t)
    return model


@dataclass(frozen=True)
class StepMeasure:
    """What one step on fake tensors costs."""

    flops: int  # forward (+ backward), as FlopCounterMode counts them
    vision_flops: int  # the part spent in the image encoder (a ``*VisionModel`` module)
    peak_bytes: int  # peak of what the step allocates, gradients of parameters excluded
    peak_with_grads_bytes: int  # peak of everything the step allocates, as the process sees it
    output_bytes: int  # allocated and still alive when the step returns (e.g. a KV cache), gradients excluded


def _vision_flops(counter: FlopCounterMode) -> int:
    """FLOPs inside the image encoder, whether it ran as the outermost module (``Blip2VisionModel``) or
    inside a composite model (``Blip2ForConditionalGeneration.vision_model``)."""
    counts = counter.get_flop_counts()
    return max([sum(ops.values()) for name, ops in counts.items()
                if name.endswith(".vision_model") or ("." not in name and name.endswith("VisionModel"))] or [0])


def measure_step(models: list[nn.Module], step: Callable[[], object], mode: FakeTensorMode) -> StepMeasure:
    """Run ``step()`` inside ``mode`` under both counters; ``models`` (already :func:`to_fake`-d) are
    what it runs, their weights made before it and so not counted.

    ``step`` builds its fake inputs and runs forward (and ``loss.backward()`` for training); what it
    returns is kept alive until the counts are taken, so an inference step can return its KV cache.

    Always both counters: a memory trace without ``FlopCounterMode`` (whose module hooks take part in
    the step) came out slightly different (the largest real-size batch moved by about 2), and the
    largest-batch fit needs its two measurements taken the same way.
    """
    params = [p for model in models for p in model.parameters()]
    for p in params:
        p.grad = None
    flops = FlopCounterMode(display=False)
    tracker = MemoryTracker([*params, *(b for model in models for b in model.buffers())])
    with mode, flops, tracker:
        result = step()
        grads = [p.grad.untyped_storage() for p in params if p.grad is not None]
        still_alive = tracker.live - sum(s.nbytes() for s in grads)
        peak, peak_with_grads = tracker.peak_without(grads), tracker.peak
    del result
    for p in params:
        p.grad = None
    return StepMeasure(int(flops.get_total_flops()), _vision_flops(flops), int(peak), int(peak_with_grads),
                       int(still_alive))
