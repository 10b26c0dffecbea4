from dataclasses import dataclass, field

import pytest

from blip2.config import ConfigError, load_config


@dataclass(frozen=True)
class Inner:
    steps: int = 10
    rate: float = 0.1
    names: tuple[str, ...] = ("a",)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


@dataclass(frozen=True)
class Outer:
    out: str = "runs/x"
    flag: bool = False
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: runs/y\ninner:\n  steps: 20\n")
    config = load_config(Outer, path, ["inner.rate=1", "flag=true", "inner.names=[b, c]"])
    assert config == Outer(out="runs/y", flag=True, inner=Inner(steps=20, rate=1.0, names=("b", "c")))
    assert load_config(Outer) == Outer()


def test_scientific_notation_without_a_dot_is_a_number():
    assert load_config(Outer, None, ["inner.rate=1e-3"]).inner.rate == 0.001  # YAML 1.1 reads it as a string
    assert load_config(Outer, None, ["inner.rate=-2.5E+2"]).inner.rate == -250.0
    with pytest.raises(ConfigError, match="inner.rate: expected a number"):
        load_config(Outer, None, ["inner.rate=fast"])


def test_one_string_is_a_list_of_one_string():
    assert load_config(Outer, None, ["inner.names=only"]).inner.names == ("only",)
    with pytest.raises(ConfigError, match="inner.steps: expected an integer"):
        load_config(Outer, None, ["inner.steps=[1]"])


@pytest.mark.parametrize("override, message", [
    ("inner.stepz=3", "unknown key.*inner.stepz"),
    ("inner.steps=many", "inner.steps: expected an integer"),
    ("inner.steps=2.5", "inner.steps: expected an integer"),
    ("flag=1", "flag: expected true/false"),
    ("inner.steps=0", "steps must be >= 1"),
    ("out", "not of the form key=value"),
    ("out.sub=1", "out: expected a string"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)
