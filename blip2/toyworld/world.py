"""The toy world: one coloured shape on a plain background, with known attributes.

Every image is fully described by four attributes (shape, colour, size, position). Rendering is
deterministic given the attributes and a numpy ``Generator`` (which draws the small jitter and the
background shade), and :func:`read_attributes` recovers the attributes from pixels alone, so the
labels can be checked against the images rather than trusted.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
}

# Centres as fractions of the image side; radii as fractions of the image side. A small shape is
# about 18 px across at 64x64, so it always covers several 8-px patches.
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
            "centre": (0.5, 0.5)}
_RADII = {"small": 0.14, "large": 0.22}
_JITTER = 0.025  # centre jitter, fraction of the side
_SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges


@dataclass(frozen=True)
class Attributes:
    """The ground truth of one toy-world image."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {values}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def replace(self, **changes: str) -> Attributes:
        return Attributes(**{**self.as_dict(), **changes})


def all_attributes() -> list[Attributes]:
    """Every attribute combination, in a fixed order."""
    return [Attributes(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape centred on (cx, cy) with outer radius r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.82  # equal-ish area to the circle, so size is not a shape cue
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r * 0.36  # half thickness of each bar
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _draw_mask(shape: str, cx: float, cy: float, r: float, image_size: int) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1], shape (image_size, image_size)."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (image_size * s, image_size * s), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _polygon(shape, cx * s, cy * s, r * s)
    if polygon is None:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon(polygon, fill=255)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(attributes: Attributes, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Render one image as uint8 RGB, shape (image_size, image_size, 3).

    The background is a plain dark grey whose shade is drawn from ``rng``; the shape's centre is
    jittered by a few pixels. Neither changes the attributes.
    """
    fx, fy = _CENTRES[attributes.position]
    jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
    cx, cy = (fx + jx) * image_size, (fy + jy) * image_size
    r = _RADII[attributes.size] * image_size * rng.uniform(0.95, 1.05)
    mask = _draw_mask(attributes.shape, cx, cy, r, image_size)[..., None]
    background = np.full(3, rng.uniform(25, 90), dtype=np.float32)
    colour = np.asarray(COLOURS[attributes.colour], dtype=np.float32)
    image = mask * colour + (1.0 - mask) * background
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """JPEG bytes of a uint8 RGB array (libjpeg is deterministic, so equal inputs give equal bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """uint8 RGB array of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def read_attributes(image: np.ndarray) -> Attributes:
    """Recover the attributes of a toy-world image from its pixels alone.

    Foreground = pixels far from the background shade (read off the corners). Colour is the palette
    entry nearest the foreground's median; position is the side the centroid is closest to; size is
    from the foreground area; shape is the template whose rendered mask best overlaps the foreground.
    """
    image_size = image.shape[0]
    pixels = image.astype(np.float32)
    corners = np.concatenate([pixels[:2, :2].reshape(-1, 3), pixels[-2:, -2:].reshape(-1, 3)])
    background = np.median(corners, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    foreground = distance > 60.0
    if foreground.sum() < 4:
        raise ValueError("no foreground shape found")
    median = np.median(pixels[foreground], axis=0)
    colour = min(COLOURS, key=lambda name: float(np.linalg.norm(median - np.asarray(COLOURS[name]))))
    ys, xs = np.nonzero(foreground)
    cx, cy = xs.mean() / image_size, ys.mean() / image_size
    position = min(_CENTRES, key=lambda p: (cx - _CENTRES[p][0]) ** 2 + (cy - _CENTRES[p][1]) ** 2)
    # Template matching: each shape, sized to the foreground's area (a few scales around it, since
    # anti-aliasing blurs thin shapes) and centred on its centroid; the best overlap names the shape.
    best = None
    for shape in SHAPES:
        unit_r = image_size * 0.2
        unit = _draw_mask(shape, image_size / 2, image_size / 2, unit_r, image_size)
        uy, ux = np.nonzero(unit > 0.5)
        for scale in (0.9, 1.0, 1.1):
            r = unit_r * math.sqrt(foreground.sum() / unit.sum()) * scale
            # Shift the template so that its centroid (not its drawing centre) lands on the foreground's.
            dx = (ux.mean() + 0.5 - image_size / 2) * r / unit_r
            dy = (uy.mean() + 0.5 - image_size / 2) * r / unit_r
            template = _draw_mask(shape, xs.mean() + 0.5 - dx, ys.mean() + 0.5 - dy, r, image_size) > 0.5
            iou = (template & foreground).sum() / max((template | foreground).sum(), 1)
            if best is None or iou > best[0]:
                best = (iou, shape, r / scale / image_size)
    _, shape, radius = best
    size = "small" if radius < (_RADII["small"] + _RADII["large"]) / 2 else "large"
    return Attributes(shape, colour, size, position)
