"""The run-time guard: test/novel records open only under an evaluation entry point."""

import threading
import types

import pytest

from blip2.toyworld import corpus, standard
from blip2.toyworld.corpus import ToyWorldConfig
from blip2.toyworld.selection import EVALUATION_ENTRY_POINTS, SelectionError

WORLD = ToyWorldConfig(web_size=3, clean_size=3, val_size=3, test_size=3, novel_size=3)


def _run_as(module: str, source: str, definitions: str = "", spec: str | None = None) -> None:
    """Run ``source`` as a function of ``module``, on a thread of its own: the allowlist admits tests,
    so none of this test's frames may be on the stack that the guard walks. ``spec`` names the module
    that ``python -m`` ran as ``__main__``."""
    namespace = {"__name__": module, "corpus": corpus, "standard": standard, "WORLD": WORLD,
                 "__spec__": types.SimpleNamespace(name=spec) if spec else None}
    code = (f"{definitions}\ndef choose():\n    {source}\n"
            "def run(raised):\n    try:\n        choose()\n    except BaseException as error:\n"
            "        raised.append(error)\n")
    exec(compile(code, module, "exec"), namespace)
    raised = []
    thread = threading.Thread(target=namespace["run"], args=(raised,))
    thread.start()
    thread.join()
    if raised:
        raise raised[0]


@pytest.mark.parametrize("split", ["test", "novel"])
def test_opening_report_splits_outside_the_evaluation_entry_points_raises(split):
    with pytest.raises(SelectionError, match=rf"'{split}' records are read only for reports.*pipelines\.tune"):
        _run_as("pipelines.tune", f"corpus.generate_split(WORLD, {split!r})")
    with pytest.raises(SelectionError, match="Make choices .* on 'val'"):
        _run_as("pipelines.tune", f"standard.standard_files('runs/toyworld', {split!r})")


def test_val_and_training_splits_open_anywhere():
    for split in ("val", "clean", "web"):
        _run_as("pipelines.tune", f"corpus.generate_split(WORLD, {split!r})")


def test_an_evaluation_entry_point_on_the_stack_opens_them():
    assert "pipelines.evaluate.resolve_files" in EVALUATION_ENTRY_POINTS
    _run_as("pipelines.evaluate", "assert len(resolve_files()) == 3",
            definitions="def resolve_files():\n    return corpus.generate_split(WORLD, 'test')\n")


def test_an_entry_point_run_as_a_script_opens_them():
    """``python -m pipelines.evaluate`` (how ``ray job submit`` runs it) names the module ``__main__``."""
    definitions = "def resolve_files():\n    return corpus.generate_split(WORLD, 'test')\n"
    _run_as("__main__", "assert len(resolve_files()) == 3", definitions, spec="pipelines.evaluate")
    with pytest.raises(SelectionError, match="pipelines.tune"):
        _run_as("__main__", "corpus.generate_split(WORLD, 'test')", spec="pipelines.tune")


def test_training_on_a_report_split_raises(tmp_path):
    from blip2.training.config import TrainConfig

    world = tmp_path / "world"
    with pytest.raises(SelectionError, match="'novel' records are read only for reports.*pipelines.train"):
        _run_as("pipelines.choose", "import pipelines.train_data, blip2.training.config as c; "
                f"pipelines.train_data.training_data(c.TrainConfig(toyworld={str(world)!r}, train_split='novel'))")
    assert not world.exists()  # refused before anything was written
    assert TrainConfig  # the config itself accepts any split name: the guard is where records open
