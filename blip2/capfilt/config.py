"""The CapFilt job's typed config: one frozen dataclass per section, defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

INPUT_FORMATS = ("webdataset", "parquet", "coco")
IMAGE_MODES = ("bytes", "reference")
BAD_CAPTION_POLICIES = ("drop", "reject")
FILTER_SCORES = ("itm", "itc")
CAPTION_DECODING = ("nucleus", "beam")  # how the captioner writes its synthetic captions


@dataclass(frozen=True)
class InputConfig:
    """Where the corpus is and how to read it.

    - ``webdataset``: ``path`` is a directory of ``*.tar`` shards (img2dataset layout: ``<key>.jpg`` /
      ``.png`` / ``.webp``, ``<key>.txt``, optional ``<key>.json``), or one ``.tar`` file.
    - ``parquet``: ``path`` is a directory of ``*.parquet`` files (or one file) with image bytes in
      ``image_column`` or a file path in ``path_column`` (relative paths resolve against ``images``, or
      the Parquet file's folder), the alt-text in ``text_column``, and optionally a ``key_column``.
    - ``coco``: ``path`` is a captions JSON (``images`` with ``id``/``file_name``, ``annotations`` with
      ``image_id``/``caption``); ``images`` the image folder. One record per annotation (an image with
      no annotation is one record without alt-text), cut into shards of ``shard_size`` records.
    """

    format: str = "webdataset"
    path: str = ""
    images: str = ""
    image_column: str = "image"
    path_column: str = "image_path"
    text_column: str = "text"
    key_column: str = "key"
    # Ground truth (is the alt-text right?), carried only into scores/ for evaluation; "" for none.
    ground_truth: str = "alt_text_matches"
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if self.format not in INPUT_FORMATS:
            raise ValueError(f"input.format must be one of {INPUT_FORMATS}, got {self.format!r}")
        if self.shard_size < 1:
            raise ValueError("input.shard_size must be >= 1")


@dataclass(frozen=True)
class ValidationConfig:
    """Limits on untrusted input. Images over them are rejected; captions over them are dropped
    (``bad_caption=drop``: the image stays and can still earn synthetic captions) or the whole record
    is rejected (``bad_caption=reject``)."""

    max_pixels: int = 40_000_000  # decompression-bomb limit, checked on the header before decoding
    max_side: int = 16_384
    max_image_bytes: int = 50_000_000
    max_caption_chars: int = 1_000
    bad_caption: str = "drop"

    def __post_init__(self) -> None:
        if self.bad_caption not in BAD_CAPTION_POLICIES:
            raise ValueError(f"validation.bad_caption must be one of {BAD_CAPTION_POLICIES}")
        if min(self.max_pixels, self.max_side, self.max_image_bytes, self.max_caption_chars) < 1:
            raise ValueError("validation limits must be positive")


@dataclass(frozen=True)
class ActorConfig:
    """Resources of one model stage's actor pool (Ray wiring reads these; the library ignores them).

    ``num_cpus`` is fractional by default: on a two-core machine whole-CPU actors can take every CPU
    and starve the read/decode tasks forever (docs/ray-and-transformers-traps.md). ``num_gpus`` may be a fraction so the
    captioner and the filter share one GPU."""

    min_actors: int = 1
    max_actors: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError("actors need 1 <= min_actors <= max_actors")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")


@dataclass(frozen=True)
class CaptionerConfig:
    """A ``Blip2ForConditionalGeneration``: a transformers directory (``import_pretrained``) or a toy
    preset name (``toy-opt``, ``toy-t5``). K = ``num_captions`` per image by nucleus sampling, or with
    ``decoding: beam`` the K best of a beam search of ``num_beams`` (BLIP's Table 2 compares the two:
    beam search writes safe, common captions, nucleus sampling more diverse ones)."""

    source: str = "toy-opt"
    num_captions: int = 3  # BLIP-2's LAVIS recipe draws 10; fewer is kinder to two CPU cores
    decoding: str = "nucleus"  # or "beam"
    top_p: float = 0.9  # BLIP's nucleus sampling
    num_beams: int = 3  # decoding: beam only (BLIP's beam size); at least num_captions
    temperature: float = 1.0
    max_new_tokens: int = 20
    min_new_tokens: int = 3
    prompt: str = ""
    batch_size: int = 16
    seed: int = 0
    actors: ActorConfig = field(default_factory=ActorConfig)

    def __post_init__(self) -> None:
        if self.num_captions < 0:
            raise ValueError("captioner.num_captions must be >= 0 (0: filter the web captions only)")
        if not 0 < self.top_p <= 1:
            raise ValueError("captioner.top_p must be in (0, 1]")
        if self.decoding not in CAPTION_DECODING:
            raise ValueError(f"captioner.decoding must be one of {CAPTION_DECODING}, got {self.decoding!r}")
        if self.decoding == "beam" and self.num_beams < max(self.num_captions, 1):
            raise ValueError(f"captioner.num_beams ({self.num_beams}) must be >= num_captions ({self.num_captions}) "
                             "with decoding: beam (the captions are the best beams)")
        if self.batch_size < 1:
            raise ValueError("captioner.batch_size must be >= 1")


@dataclass(frozen=True)
class FilterConfig:
    """A stage-1 model: a directory written by ``blip2 train stage1`` (``model/``) or any
    ``Blip2ForImageTextRetrieval`` directory, or ``toy-stage1`` (untrained, for tests). ``tokenizer`` /
    ``image_processor`` default to the model directory's, else the packaged toy backbones'."""

    source: str = "toy-stage1"
    tokenizer: str = ""
    image_processor: str = ""
    # "itm": the ITM head's match probability, in [0, 1] (BLIP's filter); "itc": the cosine similarity of
    # the ITC features, max over queries, in [-1, 1] (BLIP-2 ranked its captions by CLIP similarity).
    score: str = "itm"
    threshold: float = 0.5  # the score a caption needs to be kept
    top_n: int = 2  # then keep the best N (BLIP-2 keeps its top two)
    max_text_length: int = 32
    batch_size: int = 32
    actors: ActorConfig = field(default_factory=ActorConfig)

    def __post_init__(self) -> None:
        if self.score not in FILTER_SCORES:
            raise ValueError(f"filter.score must be one of {FILTER_SCORES}, got {self.score!r}")
        low = 0.0 if self.score == "itm" else -1.0
        if not low <= self.threshold <= 1:
            raise ValueError(f"filter.threshold must be in [{low:g}, 1] for score={self.score}")
        if self.top_n < 1 or self.batch_size < 1:
            raise ValueError("filter.top_n and filter.batch_size must be >= 1")


@dataclass(frozen=True)
class CapFiltConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: str = "runs/capfilt/out"
    image_mode: str = "bytes"  # kept/ holds the encoded image ("bytes") or only its source ("reference")
    image_size: int = 64  # decoded images travel between stages at this size (models resize if theirs differs)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    decode_batch_size: int = 64
    torch_threads: int = 1  # per actor; tiny models on shared cores lose more to contention than they gain
    max_shards: int = 0  # process at most this many pending shards, then stop (0: all); re-run to continue
    device: str = "auto"  # "auto": cuda when the actor was given a GPU, else cpu

    def __post_init__(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        if self.image_size < 8 or self.decode_batch_size < 1 or self.torch_threads < 1 or self.max_shards < 0:
            raise ValueError("image_size >= 8, decode_batch_size >= 1, torch_threads >= 1, max_shards >= 0")
