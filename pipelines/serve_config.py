"""The serving job's configuration (``blip2 serve``, ``serve run pipelines.serve:build_app``): one typed,
frozen dataclass with every default, loaded from YAML (``pipelines/configs/serve_toy.yaml`` documents
each key) and validated when loaded."""

from dataclasses import dataclass, field

from blip2.serving.requests import RequestLimits
from blip2.serving.results import RuntimeSettings

DEFAULT_CONFIG = "serve_toy.yaml"
BATCHING = ("continuous", "serve_batch")


@dataclass(frozen=True)
class ModelSettings:
    id: str = "blip2-toy-instruct-opt"  # the name clients use (/v1/models, chat "model")
    source: str = "toy-instruct-opt"  # a preset name or a transformers BLIP-2 / InstructBLIP directory
    retrieval: str = "toy-stage1"  # "toy-stage1", a stage-1 export directory, or "" (no /match, /embed)
    retrieval_tokenizer: str = ""  # Q-Former tokenizer of the stage-1 model (default: see load_retrieval)
    retrieval_image_processor: str = ""
    dtype: str = "float32"  # backbones' dtype: float32 on CPU; bfloat16/float16 on GPU
    seed: int = 0  # initialisation seed of the untrained toy presets
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def __post_init__(self) -> None:
        if not self.id or not self.source:
            raise ValueError("model.id and model.source must be set")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass(frozen=True)
class ReplicaSettings:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1  # intra-op threads per replica
    max_ongoing_requests: int = 32
    batching: str = "continuous"  # captions and answers: "continuous" (iteration-level) or "serve_batch"
    max_batch_size: int = 16  # requests decoded together (continuous), or per @serve.batch call
    batch_wait_timeout_s: float = 0.01  # @serve.batch: how long a batch waits to fill
    join_group: int = 4  # continuous: while others decode, newcomers join (are prefilled) this many at once...
    join_wait_steps: int = 4  # ... or after waiting this many decode steps
    stream_interval_s: float = 0.1  # continuous: streamed text after the first piece leaves at most this often
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0  # a replica being removed finishes its requests for this long

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or self.torch_threads < 1:
            raise ValueError("num_cpus and num_gpus must be >= 0, torch_threads >= 1")
        if not 1 <= self.max_batch_size <= self.max_ongoing_requests:
            raise ValueError("max_batch_size must be in [1, max_ongoing_requests]")
        if self.batch_wait_timeout_s < 0 or self.stream_interval_s < 0:
            raise ValueError("batch_wait_timeout_s and stream_interval_s must be >= 0")
        if self.join_group < 1 or self.join_wait_steps < 0:
            raise ValueError("join_group must be >= 1 and join_wait_steps >= 0")
        if self.batching not in BATCHING:
            raise ValueError(f"replica.batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")


@dataclass(frozen=True)
class AutoscalingSettings:
    """Ray Serve's ``autoscaling_config``: replicas follow ongoing requests per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    metrics_interval_s: float = 2.0
    look_back_period_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be > 0")


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "blip2"
    route_prefix: str = "/"
    max_body_bytes: int = 8 * 1024 * 1024  # larger bodies get a 413 before they are read
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.25
    ingress_max_ongoing_requests: int = 256  # the ingress only waits on the model: let it hold many requests
    retries: int = 2  # a request whose replica died is sent again (inference is idempotent)


@dataclass(frozen=True)
class ServeConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    replica: ReplicaSettings = field(default_factory=ReplicaSettings)
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if not self.autoscaling.target_ongoing_requests < self.replica.max_ongoing_requests:
            raise ValueError("autoscaling.target_ongoing_requests must be below replica.max_ongoing_requests "
                             "(else a replica is never busy enough to trigger a scale-up)")
