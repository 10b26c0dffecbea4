"""``blip2 evaluate``: score a checkpoint on a standard set (or the toy world's copy of one) with Ray Data
batch inference.

    python -m pipelines.evaluate task=vqav2 model=runs/train/instruct-toy-opt/model   # evaluate_toy.yaml
    python -m pipelines.evaluate --config pipelines/configs/evaluate/coco_retrieval.yaml

Tasks: coco_retrieval, coco_captions, nocaps, vqav2, okvqa, gqa (``blip2/datasets/tasks.py`` says what
each reads and scores). Each actor loads the checkpoint once and predicts batch after batch; the driver
scores. Writes ``<out>/metrics.json``, ``<out>/predictions.jsonl`` (one line per image, question or text)
and ``<out>/metrics.png``. On a toy world's copy (``toyworld=``) the toy-only metrics come beside the
standard ones (``blip2/datasets/toy.py``: attribute-level retrieval, ITM against one-attribute-wrong
captions, caption attribute accuracy, accuracy per instruction family). Training reports score their
evaluation sets with this same code (``pipelines/train_eval.py``).

Retrieval re-ranks as the stage-1 run that trained the model did: ``rerank_k`` and ``rerank_itc_scale``
default to the values in its ``report.json`` (beside ``model/``), else to stage 1's defaults.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from blip2.backbones.build import find_backbones
from blip2.config import to_dict
from blip2.datasets.errors import DatasetError
from blip2.datasets.predict import SetPredictor, itc_similarity, read_image, require_checkpoint
from blip2.datasets.tasks import (
    RETRIEVAL_KS,
    itm_candidates,
    load_task,
    question_scores,
    rerank,
    retrieval_relevance,
    score_captioning,
    score_questions,
    score_retrieval,
)
from blip2.datasets.task_kinds import TASK_KINDS, task_kind
from blip2.datasets.toy import (
    caption_metrics,
    matching_metrics,
    matching_texts,
    question_metrics,
    rerank_metrics,
    retrieval_metrics,
    set_attributes,
    toy_relevance,
)
from blip2.metrics import rerank_effect
from blip2.models.generation_params import GenerationParams
from blip2.reporting import plot_metrics
from blip2.toyworld.standard import HELD_OUT_SPLITS, standard_files
from blip2.training.config import Stage1Config, TaskSizes
from pipelines.common import init_ray, job_parser, log, parse_config, quiet_progress_bars


@dataclass(frozen=True)
class EvaluateConfig:
    task: str = "coco_captions"  # coco_retrieval, coco_captions, nocaps, vqav2, okvqa, gqa
    model: str = ""  # a transformers checkpoint directory (or an untrained toy preset, for smoke tests)
    annotations: str = ""  # captions JSON (Karpathy or COCO format), or the VQA annotations JSON
    questions: str = ""  # VQA questions JSON or GQA balanced questions JSON
    images: str = ""  # the image directory the files name their images relative to
    toyworld: str = ""  # a `blip2 toyworld` output: its standard/ copy, unless the three paths above are set
    split: str = "test"  # with toyworld: val, test or novel
    out: str = "runs/evaluate"
    prompt: str = ""  # captioning: text before the caption ("a photo of"); questions: a template with {}
    generation: GenerationParams = field(default_factory=GenerationParams)
    tokenizer: str = ""  # retrieval exports without a Q-Former tokenizer: where it is
    image_processor: str = ""  # ... and their image processor
    rerank_k: int | None = None  # retrieval: ITM re-ranks ITC's top k in each direction; None: the model's run's
    rerank_itc_scale: float | None = None  # re-rank score = ITM logit + this * ITC similarity; None: the run's
    itm_images: int = 200  # toy retrieval: images whose right / one-attribute-wrong / random captions ITM scores
    held_out: tuple[str, ...] | None = None  # toy questions: families never tuned on; None: the model's run's
    limit: int = 0  # evaluate the first N images / questions only (0: all)
    batch_size: int = 16  # images (or questions) per model call
    num_actors: int = 1  # the actor pool grows to this many; 0: the same stage in this process, no Ray (quick checks)
    cpus_per_actor: float = 0.5  # fractions leave CPUs for Ray Data's read tasks (two-core deadlock otherwise)
    gpus_per_actor: float = 0.0  # > 0: actors run on CUDA in half precision
    address: str = ""  # a Ray cluster; empty: RAY_ADDRESS (ray job submit) or a fresh local instance

    def __post_init__(self) -> None:
        task_kind(self.task)
        if self.toyworld and self.split not in HELD_OUT_SPLITS:
            raise ValueError(f"split must be one of {HELD_OUT_SPLITS}, got {self.split!r}")
        if TASK_KINDS[self.task] in ("vqa", "gqa") and self.prompt and "{}" not in self.prompt:
            raise ValueError(f"a question prompt must contain {{}} for the question, got {self.prompt!r}")
        if (self.rerank_k is not None and self.rerank_k < 1) or self.batch_size < 1 or self.num_actors < 0:
            raise ValueError("rerank_k and batch_size must be >= 1, num_actors >= 0")
        if self.limit < 0 or self.itm_images < 0 or (self.rerank_itc_scale is not None and self.rerank_itc_scale < 0):
            raise ValueError("limit, itm_images and rerank_itc_scale must be >= 0")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")

    @property
    def toy(self) -> bool:
        """Whether the set is a toy world's copy: toy-only metrics too. (Files named explicitly win over
        ``toyworld``, see :func:`resolve_files`.)"""
        return bool(self.toyworld)


def run_settings(config: EvaluateConfig) -> EvaluateConfig:
    """``config`` with the settings left to the model's training run filled in: from the ``report.json``
    a training job writes beside ``model/`` when there is one, else the training defaults. A stage-1
    export holds no tokenizer or image processor: they come from that run's backbones, or the
    ``tokenizer=`` / ``image_processor=`` directories; neither there is a clear error before Ray starts."""
    report = Path(config.model).parent / "report.json"
    try:
        trained = json.loads(report.read_text()).get("config", {}) if report.is_file() else {}
    except (OSError, ValueError):
        trained = {}
    if TASK_KINDS[config.task] == "retrieval" and Path(config.model).is_dir():
        config = _retrieval_files(config, trained)
    held_out = config.held_out
    if held_out is None:
        sizes = trained.get("tasks")
        held_out = (tuple(t for t, n in sizes.items() if n == 0) if isinstance(sizes, dict)
                    else TaskSizes().held_out())
    return replace(config, held_out=held_out,
                   rerank_k=config.rerank_k or int(trained.get("rerank_k", Stage1Config.rerank_k)),
                   rerank_itc_scale=(config.rerank_itc_scale if config.rerank_itc_scale is not None
                                     else float(trained.get("rerank_itc_scale", Stage1Config.rerank_itc_scale))))


def _retrieval_files(config: EvaluateConfig, trained: dict) -> EvaluateConfig:
    directory = Path(config.model)
    try:
        backbones = find_backbones(trained.get("backbones") or None) if trained else None
    except FileNotFoundError as error:  # the run's backbones moved away
        raise DatasetError(f"{directory}: the tokenizer and image processor of its training run: {error}") from error
    files = {"tokenizer": ("tokenizer_config.json", "the Q-Former tokenizer", "qformer_tokenizer"),
             "image_processor": ("preprocessor_config.json", "the image processor", "vision")}
    changes = {}
    for key, (marker, what, part) in files.items():
        if getattr(config, key) or (directory / marker).is_file():
            continue
        if backbones is None:
            raise DatasetError(f"{directory} has no {marker}: set {key}= to the directory of {what} the model was "
                               f"trained with (a stage-1 run's is its backbones' {part}/; nothing is downloaded)")
        changes[key] = str(getattr(backbones, part))
    return replace(config, **changes)


def resolve_files(config: EvaluateConfig) -> EvaluateConfig:
    """With ``toyworld``, the paths of its standard-format copy of ``split`` for the task (files named
    explicitly win: the toy world is only the default)."""
    if config.annotations or config.questions or config.images:
        return replace(config, toyworld="")
    if not config.toyworld:
        return config
    files = standard_files(config.toyworld, config.split)
    if not files["images"].is_dir():
        raise DatasetError(f"no standard-format toy sets under {config.toyworld}: run `blip2 toyworld --out "
                           f"{config.toyworld}` (it writes them to standard/)")
    kind = TASK_KINDS[config.task]
    annotations = {"retrieval": files["karpathy"], "vqa": files["vqa_annotations"]}.get(kind, "")
    if kind == "captioning":
        annotations = files["coco_captions"] if config.task == "nocaps" else files["karpathy"]
    questions = {"vqa": files["vqa_questions"], "gqa": files["gqa_questions"]}.get(kind, "")
    return replace(config, annotations=str(annotations), questions=str(questions), images=str(files["images"]))


class Predict:
    """A Ray Data stage (callable class): the checkpoint loads once per actor. ``mode`` is ``generate``
    (column ``path`` + ``prompt`` -> ``prediction``), ``image_features``, ``text_features`` (``text``) or
    ``itm`` (``path`` + ``candidates``, a JSON list of texts -> ``logits``, JSON). Undecodable images are
    reported in ``error`` and score as wrong; no record is dropped."""

    def __init__(self, mode: str, model: str, params: GenerationParams, tokenizer: str, image_processor: str,
                 use_gpu: bool) -> None:
        self.mode = mode
        self.predictor = SetPredictor(model, retrieval=mode != "generate", params=params, tokenizer=tokenizer,
                                      image_processor=image_processor, device="cuda" if use_gpu else "cpu")

    def _images(self, paths) -> tuple[list, list[str]]:
        images, errors = [], []
        for path in paths:
            try:
                images.append(read_image(str(path)))
                errors.append("")
            except (OSError, ValueError) as error:
                images.append(None)
                errors.append(f"{type(error).__name__}: {error}")
        return images, errors

    def __call__(self, batch: dict) -> dict:
        if self.mode == "text_features":
            return {"index": batch["index"], "features": self.predictor.text_features(list(batch["text"]))}
        images, errors = self._images(batch["path"])
        ok = [i for i, image in enumerate(images) if image is not None]
        out = {"index": batch["index"], "error": np.array(errors, dtype=object)}
        if self.mode == "generate":
            texts = self.predictor.generate([images[i] for i in ok], [str(batch["prompt"][i]) or None for i in ok])
            predictions = [""] * len(images)
            for i, text in zip(ok, texts):
                predictions[i] = text
            out["prediction"] = np.array(predictions, dtype=object)
        elif self.mode == "image_features":
            features = self.predictor.image_features([images[i] for i in ok]) if ok else None
            shape = features.shape[1:] if features is not None else (1, 1)
            out["features"] = np.zeros((len(images), *shape), dtype=np.float32)
            if ok:
                out["features"][ok] = features
        else:  # itm: every readable image's candidates, scored together
            candidates = [json.loads(texts) for texts in batch["candidates"]]
            logits = [[-1e4] * len(texts) for texts in candidates]
            if ok:
                scored = self.predictor.itm_logits([images[i] for i in ok], [candidates[i] for i in ok])
                for i, values in zip(ok, scored):
                    logits[i] = values
            out["logits"] = np.array([json.dumps(values) for values in logits], dtype=object)
        return out


def _run(rows: list[dict], mode: str, config: EvaluateConfig, batch_size: int | None = None) -> list[dict]:
    """``rows`` through :class:`Predict` on an actor pool (``num_actors`` 0: in this process, batch by
    batch); results in ``index`` order."""
    size = batch_size or config.batch_size
    if config.num_actors == 0:
        predict = Predict(mode, config.model, config.generation, config.tokenizer, config.image_processor,
                          config.gpus_per_actor > 0)
        results = []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            out = predict({key: np.array([row[key] for row in chunk]) for key in chunk[0]})
            results += [dict(zip(out, values)) for values in zip(*out.values())]
        return results
    import ray

    dataset = ray.data.from_items(rows).map_batches(  # Ray Data: one model per actor, batches stream through
        Predict, fn_constructor_kwargs={"mode": mode, "model": config.model, "params": config.generation,
                                        "tokenizer": config.tokenizer, "image_processor": config.image_processor,
                                        "use_gpu": config.gpus_per_actor > 0},
        batch_size=size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.num_actors),
        num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or None)
    results = sorted(dataset.take_all(), key=lambda row: int(row["index"]))
    if len(results) != len(rows):
        raise RuntimeError(f"{mode}: {len(rows)} records went in and {len(results)} came out")
    return results


def evaluate_generation(config: EvaluateConfig, items: Sequence) -> tuple[dict, list[dict]]:
    kind = TASK_KINDS[config.task]
    if kind == "captioning":
        prompts = [config.prompt] * len(items)
    else:
        prompts = [(config.prompt or "{}").format(item.question) for item in items]
    rows = [{"index": i, "path": str(item.path), "prompt": p} for i, (item, p) in enumerate(zip(items, prompts))]
    results = _run(rows, "generate", config)
    predictions = [str(r["prediction"]) for r in results]
    errors = [str(r["error"]) for r in results]
    if kind == "captioning":
        metrics = score_captioning(predictions, items)
        if config.toy:
            metrics.update(caption_metrics(predictions, set_attributes(items)))
        samples = [{"image_id": item.image_id, "caption": p, "references": list(item.captions), "error": e}
                   for item, p, e in zip(items, predictions, errors)]
    else:
        metrics = score_questions(config.task, predictions, items)
        scores = question_scores(config.task, predictions, items)
        if config.toy:
            metrics.update(question_metrics(predictions, items, scores, config.held_out))
        samples = [{"question_id": item.question_id, "question": item.question, "prompt": prompt, "answer": p,
                    "answers": list(item.answers), "accuracy": s, "error": e}
                   for item, prompt, p, s, e in zip(items, prompts, predictions, scores, errors)]
    metrics["unreadable_images"] = sum(bool(e) for e in errors)
    return metrics, samples


def evaluate_retrieval(config: EvaluateConfig, images: Sequence, matched: Sequence = ()) -> tuple[dict, list[dict]]:
    """Rank every caption of ``images`` against every image (ITC), re-rank each query's top ``rerank_k``
    by ITM logit + ``rerank_itc_scale`` * ITC similarity; ``_itc`` metrics rank by ITC alone, ``_itm``
    ranks the top k by ITM alone. ``matched`` (toy images, the set's first ``itm_images``): ITM also
    scores each one's right, one-attribute-wrong and random caption, in the same pass."""
    texts = [text for image in images for text in image.captions]
    text_image = [i for i, image in enumerate(images) for _ in image.captions]
    image_rows = _run([{"index": i, "path": str(image.path)} for i, image in enumerate(images)], "image_features", config)
    text_rows = _run([{"index": t, "text": text} for t, text in enumerate(texts)], "text_features", config)
    similarity = itc_similarity(np.stack([r["features"] for r in image_rows]),
                                np.stack([r["features"] for r in text_rows]))  # (I, T)
    k = config.rerank_k
    candidates = itm_candidates(similarity, k)
    pairs = matching_texts(set_attributes(matched)) if matched else None
    itm_texts = []  # per image: the re-rank's candidates, then its matching captions
    for i in range(max(len(images), len(matched))):
        chosen = [texts[t] for t in candidates[i]] if i < len(images) else []
        extra = [pairs.right[i], *(wrong[i] for wrong in pairs.wrong.values())] if i < len(matched) else []
        itm_texts.append(chosen + extra)
    pool = images if len(images) >= len(matched) else matched  # both are prefixes of the same set
    itm_rows = _run([{"index": i, "path": str(pool[i].path), "candidates": json.dumps(chosen)}
                     for i, chosen in enumerate(itm_texts)], "itm", config, batch_size=4)
    values = [json.loads(row["logits"]) for row in itm_rows]
    logits = {(i, t): value for i, chosen in enumerate(candidates) for t, value in zip(chosen, values[i])}
    rankings = {"": rerank(similarity, logits, k, config.rerank_itc_scale),
                "_itc": (similarity.t().argsort(dim=1, descending=True), similarity.argsort(dim=1, descending=True)),
                "_itm": rerank(similarity, logits, k, itc_scale=0.0)}
    metrics = {}
    for suffix, (text_to_image, image_to_text) in rankings.items():
        metrics.update(score_retrieval(text_to_image, image_to_text, text_image, len(images), suffix=suffix))
    relevant = retrieval_relevance(text_image, len(images))  # (T, I): a text's own image
    for direction, index, matrix in (("t2i", 0, relevant), ("i2t", 1, relevant.t())):
        effect = rerank_effect(rankings[""][index], rankings["_itc"][index], matrix)
        metrics.update({f"{direction}_rerank_changed": effect["changed"], f"{direction}_rerank_fixed": effect["fixed"],
                        f"{direction}_rerank_broken": effect["broken"]})
    metrics.update({"num_images": len(images), "num_texts": len(texts), "rerank_k": k,
                    "rerank_itc_scale": config.rerank_itc_scale,
                    "unreadable_images": sum(bool(r["error"]) for r in image_rows)})
    if config.toy:
        toy_relevant = toy_relevance(texts, text_image, set_attributes(images))
        for suffix, (text_to_image, image_to_text) in rankings.items():
            metrics.update(retrieval_metrics(text_to_image, image_to_text, toy_relevant, RETRIEVAL_KS, suffix))
        metrics.update(rerank_metrics(rankings[""], rankings["_itc"], toy_relevant))
        metrics["num_candidates"] = len(images)
    if matched:
        offsets = [len(candidates[i]) if i < len(images) else 0 for i in range(len(matched))]
        metrics.update(matching_metrics([values[i][o] for i, o in enumerate(offsets)],
                                        {kind: [values[i][o + 1 + n] for i, o in enumerate(offsets)]
                                         for n, kind in enumerate(pairs.wrong)}))
    text_to_image, image_to_text = rankings[""]
    samples = [{"image_id": image.image_id, "top_texts": [texts[t] for t in image_to_text[i, :5].tolist()],
                "error": str(image_rows[i]["error"])} for i, image in enumerate(images)]
    samples += [{"text": text, "image_id": images[text_image[t]].image_id,
                 "rank_of_image": int((text_to_image[t] == text_image[t]).nonzero()[0, 0]) + 1}
                for t, text in enumerate(texts)]
    return metrics, samples


def run(config: EvaluateConfig) -> dict:
    """Evaluate ``config.model`` on ``config.task``; returns the report written to ``metrics.json``."""
    require_checkpoint(config.model)  # a missing checkpoint or dataset fails before Ray starts
    config = run_settings(resolve_files(config))
    every = load_task(config.task, config.annotations, config.images, config.questions)
    items = every[: config.limit] if config.limit else every
    log(f"[evaluate] {config.task}: {len(items)} {'questions' if TASK_KINDS[config.task] in ('vqa', 'gqa') else 'images'}"
        f" from {config.questions or config.annotations}; model {config.model}")
    start = time.perf_counter()
    if config.num_actors:
        init_ray(config.address)
        quiet_progress_bars()
    if TASK_KINDS[config.task] == "retrieval":
        metrics, samples = evaluate_retrieval(config, items, every[: config.itm_images] if config.toy else ())
    else:
        metrics, samples = evaluate_generation(config, items)
    seconds = time.perf_counter() - start
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w") as file:
        for sample in samples:
            file.write(json.dumps(sample) + "\n")
    report = {"task": config.task, "model": config.model, "metrics": metrics, "seconds": round(seconds, 1),
              "config": to_dict(config)}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_metrics(metrics, out / "metrics.png", title=f"{config.task}: {Path(config.model).name}")
    headline = {k: v for k, v in metrics.items() if isinstance(v, float) and "/" not in k
                and not k.endswith(("_itc", "_itm", "_strict", "_changed")) and k != "rerank_itc_scale"}
    log(f"[evaluate] {config.task} done in {seconds:.0f}s: " + ", ".join(f"{k} {v:.3f}" for k, v in headline.items())
        + f" -> {out}/: metrics.json, predictions.jsonl, metrics.png")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("blip2 evaluate", __doc__, "evaluate_toy.yaml")
    config, _ = parse_config(parser, EvaluateConfig, argv)
    try:
        run(config)
    except DatasetError as error:
        parser.exit(2, f"blip2 evaluate: error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
