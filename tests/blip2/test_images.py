"""blip2.images.load_image: every kind of bad or unusual image a web corpus or a request body brings."""

import io

import numpy as np
import pytest
from PIL import Image

from blip2.images import REASONS, ImageError, load_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def reason_of(data: bytes, **limits) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(data, **limits)
    assert caught.value.reason in REASONS
    assert str(caught.value)  # a human sentence comes with every reason
    return caught.value.reason


def red_square(size=(16, 12)) -> Image.Image:
    return Image.new("RGB", size, (220, 20, 30))


def test_plain_rgb_jpeg_and_png_decode_to_rgb():
    for fmt in ("JPEG", "PNG"):
        image = load_image(encode(red_square(), fmt))
        assert image.mode == "RGB" and image.size == (16, 12)
        assert np.abs(np.asarray(image).astype(int) - [220, 20, 30]).max() <= 6


def test_empty_bytes():
    assert reason_of(b"") == "empty"
    assert reason_of(bytearray()) == "empty"


def test_not_an_image():
    assert reason_of(b"this is plain text, not a picture\n") == "not_an_image"
    assert reason_of(b"\x00" * 100) == "not_an_image"
    assert reason_of(b"<html><body>404</body></html>") == "not_an_image"


def test_truncated_jpeg_and_png():
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = encode(noisy, "JPEG", quality=95)
    assert reason_of(jpeg[: len(jpeg) // 2]) == "truncated"
    png = encode(noisy, "PNG")
    assert reason_of(png[: len(png) // 2]) == "truncated"


def test_decompression_bomb_uses_our_limit_not_pils_global():
    small = encode(red_square((100, 100)), "PNG")
    assert load_image(small).size == (100, 100)
    assert reason_of(small, max_pixels=9_999) == "decompression_bomb"
    assert load_image(small, max_pixels=10_000).size == (100, 100)


def test_decompression_bomb_default_limit_small_file():
    # 8000x8000 1-bit PNG: 64 M pixels claimed by a file of a few KB; over the default 40 M.
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")
    assert len(bomb) < 100_000
    assert reason_of(bomb) == "decompression_bomb"


def test_pils_own_bomb_error_and_warning_become_image_errors(monkeypatch):
    data = encode(red_square((100, 100)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)  # PIL raises above 2x its limit ...
    assert reason_of(data, max_pixels=10**9) == "decompression_bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # ... and warns between 1x and 2x
    assert reason_of(data, max_pixels=10**9) == "decompression_bomb"


def test_huge_dimensions():
    strip = encode(Image.new("L", (20_000, 2)), "PNG")
    assert reason_of(strip) == "too_large"
    assert reason_of(encode(red_square((64, 64)), "PNG"), max_side=63) == "too_large"


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    image = load_image(encode(cmyk, "JPEG", quality=95))
    assert image.mode == "RGB"
    r, g, b = np.asarray(image).reshape(-1, 3).mean(0)
    assert r > 200 and g < 40 and b < 40


def test_16bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    image = load_image(data)
    assert image.mode == "RGB"
    grey = np.asarray(image)[0, :, 0]
    assert grey.tolist() == [0, 128, 255, 4]  # clipping would give 255 for 1000 and 32768


def test_16bit_rgb_png():
    # PNG stores 48-bit RGB; PIL reads it as 8-bit RGB
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", (2).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([16, 2, 0, 0, 0]))
        + _chunk(b"IDAT", __import__("zlib").compress(b"\x00" + b"\xff\xff\x00\x00\x00\x00" * 2))
        + _chunk(b"IEND", b"")
    )
    image = load_image(raw)
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [255, 0, 0]


def _chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def test_rgba_alpha_composited_on_white():
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red
    pixels[0, 1] = (0, 0, 0, 0)  # fully transparent (black underneath)
    pixels[1, 0] = (0, 0, 255, 128)  # half-transparent blue
    image = np.asarray(load_image(encode(Image.fromarray(pixels), "PNG"))).astype(int)
    assert image[0, 0].tolist() == [255, 0, 0]
    assert image[0, 1].tolist() == [255, 255, 255]
    assert abs(image[1, 0, 0] - 127) <= 2 and image[1, 0, 2] == 255


def test_greyscale_with_alpha():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8))
    image = np.asarray(load_image(encode(la, "PNG")))
    assert image[0, 0].tolist() == [255, 255, 255] and image[0, 1].tolist() == [0, 0, 0]


def test_palette_images_with_and_without_transparency():
    palette_image = red_square().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    image = load_image(encode(palette_image, "PNG"))
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [220, 20, 30]

    transparent = Image.new("P", (2, 1))
    transparent.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    transparent.putpixel((0, 0), 0)
    transparent.putpixel((1, 0), 1)
    gif = encode(transparent, "GIF", transparency=0)
    pixels = np.asarray(load_image(gif))
    assert pixels[0, 0].tolist() == [255, 255, 255]  # transparent index -> white, not black
    assert pixels[0, 1].tolist() == [0, 255, 0]


def test_greyscale_and_one_bit():
    grey = np.asarray(load_image(encode(Image.new("L", (4, 4), 77), "PNG")))
    assert grey.shape == (4, 4, 3) and (grey == 77).all()
    bits = np.asarray(load_image(encode(Image.new("1", (4, 4), 1), "PNG")))
    assert (bits == 255).all()


def test_other_formats_decode():
    for fmt in ("GIF", "BMP", "TIFF", "WEBP"):
        image = load_image(encode(red_square(), fmt))
        assert image.mode == "RGB" and image.size == (16, 12), fmt


def test_result_is_independent_of_input_buffer():
    data = bytearray(encode(red_square(), "PNG"))
    image = load_image(data)
    data[:] = b"\x00" * len(data)
    assert np.asarray(image)[0, 0].tolist() == [220, 20, 30]


def test_image_error_is_value_error_and_rejects_unknown_reason():
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ValueError):
        ImageError("bogus", "nope")
