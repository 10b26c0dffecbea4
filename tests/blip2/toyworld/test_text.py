import numpy as np
import pytest

from blip2.toyworld.text import (
    CAPTION_TEMPLATES,
    HELD_OUT_TASKS,
    INSTRUCTION_TASKS,
    LM_TASK_WEIGHTS,
    YES_NO_TASKS,
    caption,
    caption_matches,
    instruction_example,
    lm_pretraining_example,
    parse_attributes,
)
from blip2.toyworld.world import Attributes, all_attributes

RED_CIRCLE = Attributes("circle", "red", "large", "left")


def test_every_template_states_all_four_attributes():
    assert len(CAPTION_TEMPLATES) >= 5
    for attributes in all_attributes()[::7]:
        texts = {caption(attributes, t) for t in range(len(CAPTION_TEMPLATES))}
        assert len(texts) == len(CAPTION_TEMPLATES)
        assert all(caption_matches(text, attributes) for text in texts)


def test_caption_matching_is_strict():
    assert caption_matches("a large red circle on the left", RED_CIRCLE)
    assert not caption_matches("a large red circle", RED_CIRCLE)  # position missing
    assert not caption_matches("a large blue circle on the left", RED_CIRCLE)
    assert not caption_matches("a large red or blue circle on the left", RED_CIRCLE)  # hedging
    assert parse_attributes("IMG_0412.JPG") == {}


def test_instruction_families_and_answers():
    assert set(INSTRUCTION_TASKS) == {"colour", "shape", "size", "position", "describe", "verify", "existence"}
    assert all(len(p) >= 3 for p in INSTRUCTION_TASKS.values())
    assert HELD_OUT_TASKS == ("existence",)
    rng = np.random.default_rng(0)
    assert instruction_example("colour", RED_CIRCLE, rng).answer == "red"
    assert instruction_example("position", RED_CIRCLE, rng).answer == "left"
    assert caption_matches(instruction_example("describe", RED_CIRCLE, rng).answer, RED_CIRCLE)


@pytest.mark.parametrize("task", ["verify", "existence"])
def test_yes_no_questions_are_balanced_and_truthful(task):
    rng = np.random.default_rng(0)
    answers, asked_about = [], set()
    for _ in range(400):
        example = instruction_example(task, RED_CIRCLE, rng)
        asked = parse_attributes(example.instruction)
        # verify states one attribute, existence a colour and a shape; the answer is whether all hold
        assert len(asked) == (1 if task == "verify" else 2)
        truthful = all(getattr(RED_CIRCLE, name) == value for name, value in asked.items())
        assert example.answer == ("yes" if truthful else "no")
        answers.append(example.answer)
        asked_about.update(asked)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    assert asked_about == ({"colour", "shape", "size", "position"} if task == "verify" else {"colour", "shape"})


def test_lm_pretraining_targets_agree_with_their_context():
    rng = np.random.default_rng(0)
    for _ in range(200):
        attributes = all_attributes()[int(rng.integers(len(all_attributes())))]
        example = lm_pretraining_example(attributes, rng)
        context = parse_attributes(example.context)
        stated = parse_attributes(example.target)
        for name, value in stated.items():  # the target never contradicts its context
            if name in context:
                assert context[name] == value


def test_held_out_families_are_defined_once_and_every_other_list_derives_from_it():
    """HELD_OUT_TASKS is the one definition: the training default, every shipped instruction-tuning
    config and the demo hold out exactly those families (size 0), and evaluation reports them apart."""
    from blip2.config import load_config
    from blip2.training.config import InstructConfig, TaskSizes
    from pipelines.common import CONFIG_DIR
    from pipelines.demo import DemoConfig

    assert TaskSizes().held_out() == HELD_OUT_TASKS
    assert all(size > 0 for task, size in TaskSizes().as_dict().items() if task not in HELD_OUT_TASKS)
    for path in sorted(CONFIG_DIR.glob("instruct_*.yaml")):
        assert load_config(InstructConfig, path).tasks.held_out() == HELD_OUT_TASKS, path.name
    assert load_config(DemoConfig, CONFIG_DIR / "demo.yaml").instruct.tasks.held_out() == HELD_OUT_TASKS


def test_every_list_of_instruction_families_derives_from_the_one_definition():
    """A new family in INSTRUCTION_TASKS reaches every list of families without another edit."""
    from blip2.toyworld import standard
    from blip2.training.config import TaskSizes
    from pipelines.demo_requests import QUESTION_TASKS

    questions = tuple(task for task in INSTRUCTION_TASKS if task != "describe")  # describe asks for a caption
    assert standard.QUESTION_FAMILIES == QUESTION_TASKS == questions
    assert set(YES_NO_TASKS) <= set(INSTRUCTION_TASKS) and standard.YES_NO_FAMILIES == YES_NO_TASKS
    assert tuple(TaskSizes().as_dict()) == tuple(INSTRUCTION_TASKS)
    assert tuple(LM_TASK_WEIGHTS) == tuple(INSTRUCTION_TASKS)
