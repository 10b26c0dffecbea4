import numpy as np
import pytest

from blip2.toyworld.world import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SHAPES,
    Attributes,
    all_attributes,
    decode_image,
    encode_jpeg,
    read_attributes,
    render,
)


def test_attribute_spaces_are_large_enough():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 6
    assert set(POSITIONS) == {"left", "right", "top", "bottom", "centre"}
    assert len(all_attributes()) == np.prod([len(v) for v in ATTRIBUTES.values()])


def test_unknown_attribute_is_rejected():
    with pytest.raises(ValueError, match="unknown colour"):
        Attributes("circle", "magenta", "small", "left")


def test_render_is_deterministic_by_seed():
    a = Attributes("star", "blue", "small", "top")
    first = render(a, np.random.default_rng(5))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render(a, np.random.default_rng(5)))
    assert not np.array_equal(first, render(a, np.random.default_rng(6)))  # jitter and background vary


def test_every_attribute_combination_reads_back_from_pixels_after_jpeg():
    """The ground truth is checkable: the attributes are recovered from the decoded JPEG alone."""
    rng = np.random.default_rng(0)
    for attributes in all_attributes():
        image = decode_image(encode_jpeg(render(attributes, rng)))
        assert read_attributes(image) == attributes


def test_pixel_reader_notices_a_wrong_label():
    rng = np.random.default_rng(1)
    image = render(Attributes("circle", "red", "large", "left"), rng)
    assert read_attributes(image) != Attributes("square", "red", "large", "left")
    with pytest.raises(ValueError, match="no foreground"):
        read_attributes(np.full((64, 64, 3), 40, dtype=np.uint8))


def test_other_image_sizes_render_and_read_back():
    rng = np.random.default_rng(2)
    attributes = Attributes("cross", "green", "small", "bottom")
    image = render(attributes, rng, image_size=96)
    assert image.shape == (96, 96, 3)
    assert read_attributes(image) == attributes
