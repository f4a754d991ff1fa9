"""`builtin:faces`: a procedural dataset of simple, varied cartoon faces.

Nothing is downloaded: every face is drawn with PIL from a handful of random choices
(skin tone, face shape, hair colour and style, eyes, brows, nose, mouth, clothes,
background, small position and scale jitter). Face `i` depends only on `(seed, i)`,
so any subset can be redrawn exactly, at any resolution.

Drawing happens in two steps: `sample_face` turns a random generator into a
`FaceParams` (plain numbers in a unit square, y pointing down), and `render_face`
paints those at `SUPERSAMPLE`× the target size and box-filters down, which
anti-aliases every edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

VERSION = 1  # bump whenever the drawing changes: it is part of the builtin's cache key

Color = tuple[int, int, int]

SKIN_TONES: list[Color] = [
    (255, 224, 196), (246, 208, 178), (241, 194, 167), (232, 180, 140),
    (224, 172, 138), (210, 155, 115), (198, 134, 99), (176, 116, 82),
    (161, 102, 70), (135, 85, 58), (112, 70, 48), (88, 56, 40),
]
HAIR_COLORS: list[Color] = [
    (28, 24, 24), (45, 32, 26), (72, 46, 30), (108, 70, 40), (140, 62, 30),
    (188, 96, 44), (214, 176, 104), (236, 210, 150), (150, 150, 150), (226, 226, 222),
]
FUN_HAIR_COLORS: list[Color] = [(60, 110, 200), (210, 80, 150), (70, 160, 110), (140, 80, 190)]
IRIS_COLORS: list[Color] = [
    (60, 40, 25), (95, 60, 35), (130, 90, 50), (70, 110, 160), (80, 130, 90), (110, 120, 120),
]
LIP_COLORS: list[Color] = [(150, 60, 60), (170, 80, 80), (120, 50, 50), (190, 90, 100)]
HAIR_STYLES = ("bald", "short", "long", "bun", "curly", "bob")
FACE_SHAPES = ("oval", "round", "square")
MOUTHS = ("smile", "neutral", "open", "grin")


@dataclass(frozen=True)
class FaceParams:
    """Everything that makes one face; lengths are fractions of the image side."""

    background: tuple[Color, Color]
    gradient_angle: float | None  # radians; None for a solid background
    center: tuple[float, float]
    radii: tuple[float, float]  # half width, half height of the face
    shape: str
    skin: Color
    hair: Color
    hair_style: str
    hairline: tuple[float, float]  # left/right fringe angles in degrees (bigger = higher)
    shirt: Color
    eye_spacing: float  # distance from the centre line, as a fraction of the face half-width
    eye_height: float  # above the face centre, as a fraction of the face half-height
    eye_radius: float  # as a fraction of the face half-width
    eye_openness: float  # height / width of the eye white
    iris: Color
    dot_eyes: bool
    brow_angle: float  # degrees; positive raises the outer ends
    brow_thickness: float
    nose: str
    mouth: str
    mouth_width: float  # as a fraction of the face half-width
    lips: Color
    blush: bool
    glasses: bool


# --------------------------------------------------------------------------- sampling


def face_rng(index: int, seed: int) -> np.random.Generator:
    """A generator that depends only on `(seed, index)`."""
    if index < 0:
        raise ValueError(f"face index must be >= 0, got {index}")
    return np.random.default_rng([seed % 2**64, index])


def jitter(rng: np.random.Generator, color: Color, amount: int) -> Color:
    """`color` with each channel moved by up to ±amount."""
    moved = np.asarray(color) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(moved, 0, 255))  # type: ignore[return-value]


def random_color(rng: np.random.Generator, lo: int, hi: int) -> Color:
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))  # type: ignore[return-value]


def sample_face(rng: np.random.Generator) -> FaceParams:
    """Draw every random choice of one face from `rng`."""
    u = rng.uniform
    scale = u(0.88, 1.08)
    background = (random_color(rng, 40, 240), random_color(rng, 40, 240))
    hair_palette = FUN_HAIR_COLORS if rng.random() < 0.08 else HAIR_COLORS
    return FaceParams(
        background=background,
        gradient_angle=u(0, 2 * math.pi) if rng.random() < 0.5 else None,
        center=(0.5 + u(-0.04, 0.04), 0.47 + u(-0.03, 0.04)),
        radii=(0.22 * scale * u(0.88, 1.12), 0.28 * scale * u(0.9, 1.1)),
        shape=str(rng.choice(FACE_SHAPES)),
        skin=jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 8),
        hair=jitter(rng, hair_palette[rng.integers(len(hair_palette))], 10),
        hair_style=str(rng.choice(HAIR_STYLES, p=[0.12, 0.26, 0.2, 0.12, 0.15, 0.15])),
        hairline=(u(22, 48), u(22, 48)),
        shirt=random_color(rng, 20, 230),
        eye_spacing=u(0.34, 0.46),
        eye_height=u(0.0, 0.14),
        eye_radius=u(0.13, 0.2),
        eye_openness=u(0.65, 1.0),
        iris=jitter(rng, IRIS_COLORS[rng.integers(len(IRIS_COLORS))], 10),
        dot_eyes=bool(rng.random() < 0.2),
        brow_angle=u(-14, 6),
        brow_thickness=u(0.05, 0.09),
        nose=str(rng.choice(("none", "line", "button"), p=[0.2, 0.4, 0.4])),
        mouth=str(rng.choice(MOUTHS, p=[0.4, 0.2, 0.2, 0.2])),
        mouth_width=u(0.3, 0.55),
        lips=jitter(rng, LIP_COLORS[rng.integers(len(LIP_COLORS))], 10),
        blush=bool(rng.random() < 0.3),
        glasses=bool(rng.random() < 0.15),
    )


# --------------------------------------------------------------------------- drawing


def supersample_factor(resolution: int) -> int:
    """How much larger than the target the canvas is; at least 2, about 512 px at most."""
    return max(2, min(4, 512 // resolution))


def shade(color: Color, factor: float) -> Color:
    return tuple(int(min(255, c * factor)) for c in color)  # type: ignore[return-value]


class Painter:
    """ImageDraw in unit coordinates: (0, 0) is the top left, (1, 1) the bottom right."""

    def __init__(self, canvas: Image.Image):
        self.size = canvas.width
        self.draw = ImageDraw.Draw(canvas, "RGBA")

    def box(self, cx: float, cy: float, rx: float, ry: float) -> list[float]:
        s = self.size
        return [(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple[int, ...]) -> None:
        self.draw.ellipse(self.box(cx, cy, rx, ry), fill=fill)

    def rounded(self, cx: float, cy: float, rx: float, ry: float, radius: float, fill: Color) -> None:
        self.draw.rounded_rectangle(self.box(cx, cy, rx, ry), radius=radius * self.size, fill=fill)

    def chord(self, cx: float, cy: float, rx: float, ry: float, start: float, end: float, fill: Color) -> None:
        # Whole-degree angles: PIL's chord can spill a stray line for fractional ones.
        self.draw.chord(self.box(cx, cy, rx, ry), round(start), round(end), fill=fill)

    def arc(
        self, cx: float, cy: float, rx: float, ry: float, start: float, end: float, fill: Color, width: float
    ) -> None:
        width_px = max(1, round(width * self.size))
        self.draw.arc(self.box(cx, cy, rx, ry), round(start), round(end), fill=fill, width=width_px)

    def line(self, points: list[tuple[float, float]], fill: Color, width: float) -> None:
        s = self.size
        pixels = [(x * s, y * s) for x, y in points]
        self.draw.line(pixels, fill=fill, width=max(1, round(width * s)), joint="curve")


def paint_background(p: FaceParams, size: int) -> Image.Image:
    """A solid colour, or a two-colour linear gradient at `p.gradient_angle`."""
    first, second = p.background
    if p.gradient_angle is None:
        return Image.new("RGB", (size, size), first)
    grid = np.linspace(-0.5, 0.5, 16)
    t = grid[None, :] * math.cos(p.gradient_angle) + grid[:, None] * math.sin(p.gradient_angle)
    t = (t - t.min()) / (t.max() - t.min())
    pixels = (1 - t[..., None]) * np.asarray(first) + t[..., None] * np.asarray(second)
    return Image.fromarray(pixels.round().astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)


def paint_hair_back(d: Painter, p: FaceParams) -> None:
    """Hair that sits behind the head: the mass of long, curly and bob styles, the bun."""
    (cx, cy), (rx, ry), hair = p.center, p.radii, p.hair
    if p.hair_style == "bun":
        d.ellipse(cx, cy - ry * 1.12, rx * 0.42, rx * 0.38, hair)
    if p.hair_style == "long":
        d.rounded(cx, cy + ry * 0.25, rx * 1.22, ry * 1.3, rx * 0.9, hair)
    elif p.hair_style == "bob":
        d.rounded(cx, cy - ry * 0.1, rx * 1.2, ry * 1.02, rx * 0.8, hair)
    elif p.hair_style == "curly":
        d.ellipse(cx, cy - ry * 0.25, rx * 1.4, ry * 1.0, hair)
        for k in range(12):  # bumps around the rim make the outline curly
            a = math.pi * (0.9 + 1.2 * k / 11)
            bx, by = cx + math.cos(a) * rx * 1.32, cy - ry * 0.25 + math.sin(a) * ry * 0.95
            d.ellipse(bx, by, rx * 0.24, rx * 0.24, hair)
    if p.hair_style != "bald":
        d.ellipse(cx, cy - ry * 0.1, rx * 1.08, ry * 1.0, hair)


def paint_body(d: Painter, p: FaceParams) -> None:
    """Shoulders in a shirt, and a neck in a slightly darker skin tone."""
    (cx, cy), (rx, ry) = p.center, p.radii
    d.ellipse(cx, cy + ry + 0.36, rx * 2.1, 0.3, p.shirt)
    d.rounded(cx, cy + ry * 0.95, rx * 0.42, ry * 0.4, rx * 0.15, shade(p.skin, 0.88))


def paint_head(d: Painter, p: FaceParams) -> None:
    """Ears (unless the hair hides them), then the face in one of three shapes."""
    (cx, cy), (rx, ry), skin = p.center, p.radii, p.skin
    if p.hair_style not in ("long", "bob"):  # those cover the ears
        for side in (-1, 1):
            d.ellipse(cx + side * rx * 0.97, cy + ry * 0.02, rx * 0.17, ry * 0.17, shade(skin, 0.92))
    if p.shape == "oval":
        d.ellipse(cx, cy, rx, ry, skin)
    elif p.shape == "round":
        d.ellipse(cx, cy, rx * 1.04, ry * 0.94, skin)
    else:
        d.rounded(cx, cy, rx, ry, rx * 0.75, skin)


def paint_fringe(d: Painter, p: FaceParams) -> None:
    """The hair over the forehead: a chord whose two ends set a (possibly slanted) hairline."""
    if p.hair_style == "bald":
        return
    (cx, cy), (rx, ry) = p.center, p.radii
    left, right = p.hairline
    if p.hair_style == "bob":  # heavy straight bangs
        left = right = min(left, right) - 6
    d.chord(cx, cy - ry * 0.06, rx * 1.06, ry * 1.0, 180 + left, 360 - right, p.hair)


def paint_eyes(d: Painter, p: FaceParams) -> None:
    """Brows, then eyes: a white, an iris, a pupil and a highlight (or just dark dots)."""
    (cx, cy), (rx, ry) = p.center, p.radii
    r = rx * p.eye_radius
    ey = cy - ry * p.eye_height
    brow_color = shade(p.hair, 0.7) if p.hair_style != "bald" else shade(p.skin, 0.55)
    for side in (-1, 1):
        ex = cx + side * rx * p.eye_spacing
        tilt = math.radians(p.brow_angle) * side
        by = ey - r * 2.1
        half = r * 1.25
        dx, dy = half * math.cos(tilt), half * math.sin(tilt)
        arch = r * 0.3  # the middle sits a little higher than the ends
        d.line([(ex - dx, by + dy), (ex, by - arch), (ex + dx, by - dy)], brow_color, rx * p.brow_thickness)
        if p.dot_eyes:
            d.ellipse(ex, ey, r * 0.6, r * 0.75, (30, 24, 24))
            continue
        d.ellipse(ex, ey, r * 1.05, r * p.eye_openness, (250, 250, 248))
        iris = r * 0.62
        d.ellipse(ex, ey, iris, min(iris, r * p.eye_openness), p.iris)
        d.ellipse(ex, ey, iris * 0.5, iris * 0.5, (15, 12, 12))
        d.ellipse(ex + iris * 0.35, ey - iris * 0.35, iris * 0.25, iris * 0.25, (255, 255, 255))


def paint_nose_and_mouth(d: Painter, p: FaceParams) -> None:
    """A nose (none, a short line or a button), cheeks, and one of four mouths."""
    (cx, cy), (rx, ry) = p.center, p.radii
    nose_y = cy + ry * 0.22
    if p.nose == "line":
        d.arc(cx, nose_y - ry * 0.05, rx * 0.1, ry * 0.08, 20, 160, shade(p.skin, 0.7), rx * 0.05)
    elif p.nose == "button":
        d.ellipse(cx, nose_y, rx * 0.11, ry * 0.07, shade(p.skin, 0.86))
    if p.blush:
        for side in (-1, 1):
            d.ellipse(cx + side * rx * 0.55, cy + ry * 0.25, rx * 0.17, ry * 0.09, (235, 90, 100, 90))
    w = rx * p.mouth_width
    my = cy + ry * 0.55
    if p.mouth == "smile":
        d.arc(cx, my - ry * 0.1, w, ry * 0.12, 15, 165, p.lips, rx * 0.07)
    elif p.mouth == "neutral":
        d.line([(cx - w * 0.8, my), (cx + w * 0.8, my)], p.lips, rx * 0.07)
    elif p.mouth == "open":
        d.ellipse(cx, my, w * 0.55, ry * 0.1, (90, 25, 30))
        d.ellipse(cx, my + ry * 0.05, w * 0.35, ry * 0.04, (205, 90, 95))
    else:  # grin: a half-moon with a row of teeth
        d.chord(cx, my - ry * 0.08, w, ry * 0.16, 0, 180, (90, 25, 30))
        d.chord(cx, my - ry * 0.08, w * 0.9, ry * 0.06, 0, 180, (250, 250, 245))


def paint_glasses(d: Painter, p: FaceParams) -> None:
    (cx, cy), (rx, ry) = p.center, p.radii
    r = rx * max(p.eye_radius, 0.15) * 1.8
    ey = cy - ry * p.eye_height
    for side in (-1, 1):
        ex = cx + side * rx * p.eye_spacing
        frame = max(1, round(rx * 0.05 * d.size))
        d.draw.ellipse(d.box(ex, ey, r, r * 0.85), outline=(30, 30, 35), width=frame)
    gap = rx * p.eye_spacing - r
    d.line([(cx - gap, ey), (cx + gap, ey)], (30, 30, 35), rx * 0.05)


def render_face(p: FaceParams, resolution: int) -> Image.Image:
    """Paint `p` at `resolution`×`resolution` (RGB), anti-aliased by supersampling."""
    factor = supersample_factor(resolution)
    canvas = paint_background(p, resolution * factor)
    d = Painter(canvas)
    paint_hair_back(d, p)
    paint_body(d, p)
    paint_head(d, p)
    paint_fringe(d, p)
    paint_eyes(d, p)
    paint_nose_and_mouth(d, p)
    if p.glasses:
        paint_glasses(d, p)
    return canvas.reduce(factor)


# --------------------------------------------------------------------------- public API


def draw_face(index: int, resolution: int, seed: int = 0) -> Image.Image:
    """Face number `index` of the set fixed by `seed`, as an RGB image."""
    return render_face(sample_face(face_rng(index, seed)), resolution)


def draw_faces(count: int, resolution: int, seed: int = 0, on_face: Callable[[], None] | None = None) -> np.ndarray:
    """Faces `0 … count-1` as uint8 `(count, resolution, resolution, 3)`; `on_face()` after each."""
    out = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for i in range(count):
        out[i] = np.asarray(draw_face(i, resolution, seed))
        if on_face is not None:
            on_face()
    return out
