"""``blip2 plan``'s typed config, the GPUs it knows, and the papers' schedules."""

from __future__ import annotations

from dataclasses import dataclass

from blip2.planning.presets import PRESETS, VISION_ENCODERS

STAGES = ("stage1", "stage2", "instruct", "capfilt", "serve")


@dataclass(frozen=True)
class Gpu:
    """Memory and dense bf16 tensor-core peak (no sparsity), from the vendors' data sheets."""

    name: str
    memory_gib: float
    bf16_tflops: float


GPUS: dict[str, Gpu] = {
    "a100-40g": Gpu("A100-40G", 40, 312),
    "a100-80g": Gpu("A100-80G", 80, 312),
    "h100-80g": Gpu("H100-80G", 80, 989),  # SXM; the PCIe card is 756
    "l4": Gpu("L4", 24, 121),
    "a10g": Gpu("A10G", 24, 70),  # AWS's A10 variant: half the A10's 125 per clock and SM
}

# The papers' schedules. BLIP-2 §4: stage 1 250k steps at batch 2320 (ViT-L) / 1680 (ViT-g); stage 2 80k
# steps at 1920 (OPT) / 1520 (Flan-T5); 129M images. InstructBLIP §3.5: at most 60k steps at batch 192 /
# 128 / 64 for 3B / 7B / 11-13B LLMs. CapFilt: one pass over the corpus.
STAGE1_STEPS, STAGE2_STEPS, INSTRUCT_STEPS = 250_000, 80_000, 60_000
STAGE1_BATCH = {"vit-l": 2320, "vit-g": 1680}
STAGE2_BATCH = {"opt": 1920, "flan-t5": 1520}
INSTRUCT_BATCH = {"flan-t5-xl": 192, "vicuna-7b": 128, "flan-t5-xxl": 64}
PAPER_IMAGES = 129_000_000


@dataclass(frozen=True)
class PlanConfig:
    """What to plan. Defaults: the papers' settings on BLIP-2's machine (16 A100-40G).

    Sequence lengths are per sample and assumed (the papers give maxima, not averages): captions of
    ``text_length`` tokens (Flan-T5's stage 2 puts a quarter of them in the encoder as the prefix),
    instructions of ``instruction_length`` and answers of ``answer_length`` tokens; generation writes
    ``new_tokens`` after a ``prompt_length``-token prompt, ``num_captions`` per image in CapFilt."""

    presets: tuple[str, ...] = tuple(PRESETS)
    stages: tuple[str, ...] = ("stage1", "stage2", "instruct")
    gpu: str = "a100-40g"
    gpu_memory_gib: float = 0.0  # > 0: overrides the GPU's memory
    gpu_tflops: float = 0.0  # > 0: overrides the GPU's bf16 peak
    workers: int = 16  # GPUs, one worker each
    mfu: float = 0.4  # fixed in advance: achieved / peak bf16 FLOP/s
    memory_fraction: float = 0.9  # of GPU memory usable by tensors (CUDA context, allocator fragmentation)
    vision: str = ""  # stage 1's image encoder; "": the presets' (vit-g)
    steps: int = 0  # 0: the paper's schedule
    global_batch: int = 0  # 0: the paper's
    serve_batch: int = 32  # concurrent requests per replica
    capfilt_batch: int = 64  # images per captioner / filter call
    text_length: int = 32
    instruction_length: int = 32
    answer_length: int = 16
    prompt_length: int = 8
    new_tokens: int = 30
    num_captions: int = 5
    dataset_images: int = PAPER_IMAGES  # one epoch; CapFilt's corpus and the feature cache's size

    def __post_init__(self) -> None:
        for name in self.presets:
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; expected some of {', '.join(PRESETS)}")
        for stage in self.stages:
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; expected some of {', '.join(STAGES)}")
        if self.gpu not in GPUS:
            raise ValueError(f"unknown gpu {self.gpu!r}; expected one of {', '.join(GPUS)} "
                             "(or any of them with gpu_memory_gib= / gpu_tflops=)")
        if self.vision and self.vision not in VISION_ENCODERS:
            raise ValueError(f"vision must be one of {VISION_ENCODERS} or empty, got {self.vision!r}")
        if not 0 < self.mfu <= 1 or not 0 < self.memory_fraction <= 1:
            raise ValueError("mfu and memory_fraction must be in (0, 1]")
        positive = ("workers", "serve_batch", "capfilt_batch", "text_length", "instruction_length",
                    "answer_length", "new_tokens", "num_captions", "dataset_images")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.steps, self.global_batch, self.prompt_length) < 0:
            raise ValueError("steps, global_batch and prompt_length must be >= 0")

    def device(self) -> Gpu:
        gpu = GPUS[self.gpu]
        return Gpu(gpu.name, self.gpu_memory_gib or gpu.memory_gib, self.gpu_tflops or gpu.bf16_tflops)
