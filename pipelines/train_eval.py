"""The evaluation sets a training config names (``eval:``), scored on the job's export by ``blip2
evaluate``'s code (:func:`pipelines.evaluate.run`): the same loaders, the same metrics, the same Ray Data
stage as a standalone evaluation. ``pipelines/train.py`` calls these; they hold no metric of their own."""

from __future__ import annotations

from pathlib import Path

from blip2.config import ConfigError
from blip2.datasets.task_kinds import TASK_KINDS
from blip2.training.config import InstructConfig, Stage1Config, TrainConfig
from pipelines.evaluate import EvaluateConfig, run


STAGE_TASK_KINDS = {"stage1": ("retrieval",), "stage2": ("captioning",), "instruct": ("captioning", "vqa", "gqa")}


def check_eval_sets(stage: str, config: TrainConfig) -> None:
    """Fail before training when ``eval`` names a task the stage's model cannot do."""
    for eval_set in config.eval:
        if TASK_KINDS[eval_set.task] not in STAGE_TASK_KINDS[stage]:
            raise ConfigError(f"eval task {eval_set.task} needs a {TASK_KINDS[eval_set.task]} model; {stage} trains "
                              f"one for {' / '.join(STAGE_TASK_KINDS[stage])}")


def evaluate_training_output(config: TrainConfig, model_dir: Path, qformer_tokenizer: str,
                             vision: str, num_actors: int | None = None) -> dict:
    """Score the exported ``model_dir`` on every set of ``config.eval``; ``{set name: metrics}``. A toy
    split's standard copy is written with the toy world only when a set names one. Retrieval re-ranks
    with stage 1's ``rerank_k`` / ``rerank_itc_scale``; toy questions are held in or out by ``tasks``.
    ``num_actors``: the evaluation's actor pool; None: the config's (``eval_num_actors``); 0: in this
    process, no Ray (``blip2 reproduce``'s in-process trials)."""
    from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld

    settings: dict = {}  # what the run itself decides: how stage 1 re-ranks, which families were never tuned on
    if isinstance(config, Stage1Config):
        settings = {"rerank_k": config.rerank_k, "rerank_itc_scale": config.rerank_itc_scale,
                    "itm_images": config.itm_eval_images}
    elif isinstance(config, InstructConfig):
        settings = {"held_out": config.tasks.held_out()}
    actors = config.eval_actors if num_actors is None else num_actors
    results = {}
    for eval_set in config.eval:
        if eval_set.split:
            ensure_toyworld(ToyWorldJobConfig(out=config.toyworld, world=config.world))
        retrieval = TASK_KINDS[eval_set.task] == "retrieval"
        scaling = config.scaling
        report = run(EvaluateConfig(
            task=eval_set.task, model=str(model_dir), annotations=eval_set.annotations, questions=eval_set.questions,
            images=eval_set.images, toyworld=config.toyworld if eval_set.split else "", split=eval_set.split or "test",
            out=str(config.output / "eval" / eval_set.name.replace("/", "-")), prompt=eval_set.prompt,
            generation=eval_set.generation, limit=eval_set.limit, **settings,
            tokenizer=qformer_tokenizer if retrieval else "", image_processor=vision if retrieval else "",
            num_actors=actors,
            gpus_per_actor=scaling.gpus_per_worker if scaling.use_gpu else 0.0))
        results[eval_set.name] = {**report["metrics"], "seconds": report["seconds"], "actors": actors}
    return results
