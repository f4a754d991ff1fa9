"""A small CNN that reads `builtin:faces` attributes back from an image.

It plays the part the small digit classifier plays for MNIST: a feature network that
knows the domain, for FID-like distances (its penultimate features) and for a
"legibility" score of generated samples (does each head recognise what it sees?).

The attributes (`HEADS`) are the generator's own random choices, read from its
`FaceParams` by `face_labels`: hair style, face shape, mouth, nose, glasses, blush and
dot eyes as they are, and skin tone, hair colour and background binned. Every head is
categorical and defined for every face (a bald face's hair colour is "none"). At 32 px
most heads are right on about 98-99 % of unseen faces; nose, mouth (smile or neutral)
and shape (oval or round) differ by under a pixel and are right on about 91-95 %. The
weights file records each head's held-out accuracy.

The network is trained on faces drawn at `resolution` (32 px, the quickstart's) by
`scripts/train_face_attributes.py` and shipped as `weights/face-attributes.safetensors`.
Images of any other side (64 px, …) are first resized to it inside `features()` with
antialiased bilinear interpolation; faces drawn at 64 px are read about as well as at 32.

The file's string metadata holds JSON values: the heads and their classes, the faces
generator version (`faces.VERSION`), the resolution, the architecture, how it was
trained and its held-out accuracy per head. A file made for another version of the
drawing code is refused: its labels may no longer match what the generator draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ldm_cli.common.files import atomic_write
from ldm_cli.data import faces
from ldm_cli.data.faces import FaceParams
from ldm_cli.errors import CheckpointError

FORMAT = "ldm-face-attributes"
WEIGHTS_FILE = "face-attributes.safetensors"


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Head:
    """One categorical attribute: a name and its classes, in label order."""

    name: str
    classes: tuple[str, ...]


NO_YES = ("no", "yes")
NOSES = ("none", "line", "button")  # as `faces.sample_face` draws them
HEADS: tuple[Head, ...] = (
    Head("hair_style", faces.HAIR_STYLES),
    Head("shape", faces.FACE_SHAPES),
    Head("mouth", faces.MOUTHS),
    Head("nose", NOSES),
    Head("glasses", NO_YES),
    Head("blush", NO_YES),
    Head("dot_eyes", NO_YES),
    Head("skin_tone", ("light", "medium", "tan", "dark")),
    Head("hair_color", ("none", "dark", "brown", "ginger", "blonde", "grey", "white", "fun")),
    Head("background", ("dark", "mid", "light")),
    Head("gradient", NO_YES),
)

# Palette index → bin. Colours of different bins differ by more than twice the
# generator's jitter in some channel, so the nearest palette colour gives the bin.
SKIN_TONE_BINS = (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3)  # by lightness, 3 tones each
HAIR_PALETTE = faces.HAIR_COLORS + faces.FUN_HAIR_COLORS
# Hair: black to dark brown | brown, auburn | ginger | two blondes | grey | white | blue, pink, green, purple.
HAIR_COLOR_BINS = (1, 1, 1, 2, 2, 3, 4, 4, 5, 6) + (7,) * len(faces.FUN_HAIR_COLORS)
BACKGROUND_LIGHTNESS = (110.0, 170.0)  # luma thresholds between dark | mid | light


def luma(color: tuple[float, ...]) -> float:
    """Rec. 601 luma of an RGB colour in [0, 255]."""
    r, g, b = color
    return 0.299 * r + 0.587 * g + 0.114 * b


def nearest(color: faces.Color, palette: list[faces.Color]) -> int:
    """Index of the palette colour nearest to `color` (largest channel difference)."""
    return min(range(len(palette)), key=lambda i: max(abs(a - b) for a, b in zip(color, palette[i])))


def background_lightness(p: FaceParams) -> float:
    """Luma of the mean background colour (a gradient averages its two ends)."""
    first, second = p.background
    mean = first if p.gradient_angle is None else tuple((a + b) / 2 for a, b in zip(first, second))
    return luma(mean)


def face_labels(p: FaceParams) -> dict[str, int]:
    """The class index of every head in `HEADS` for the face `p`."""
    hair = 0 if p.hair_style == "bald" else HAIR_COLOR_BINS[nearest(p.hair, HAIR_PALETTE)]
    return {
        "hair_style": faces.HAIR_STYLES.index(p.hair_style),
        "shape": faces.FACE_SHAPES.index(p.shape),
        "mouth": faces.MOUTHS.index(p.mouth),
        "nose": NOSES.index(p.nose),
        "glasses": int(p.glasses),
        "blush": int(p.blush),
        "dot_eyes": int(p.dot_eyes),
        "skin_tone": SKIN_TONE_BINS[nearest(p.skin, faces.SKIN_TONES)],
        "hair_color": hair,
        "background": sum(background_lightness(p) >= t for t in BACKGROUND_LIGHTNESS),
        "gradient": int(p.gradient_angle is not None),
    }


# --------------------------------------------------------------------------- network


def conv_block(c_in: int, c_out: int, stride: int = 1) -> torch.nn.Sequential:
    """3×3 convolution, GroupNorm (the same in training and eval), SiLU."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        torch.nn.GroupNorm(8, c_out),
        torch.nn.SiLU(),
    )


class FaceAttributeNet(torch.nn.Module):
    """Conv stages of `blocks[i]` blocks with `channels[i]` channels (each stage after
    the first starts by halving the side), a 1×1 projection to `feature_dim`, global
    average pooling, and one linear head per attribute.

    Takes float images in [-1, 1] of shape `(N, 3, S, S)`, any `S`: they are brought
    to `resolution` first (see the module docstring).
    """

    def __init__(
        self,
        heads: tuple[Head, ...] = HEADS,
        channels: tuple[int, ...] = (16, 32, 64, 128),
        blocks: tuple[int, ...] = (2, 2, 2, 1),
        feature_dim: int = 192,
        resolution: int = 32,
    ):
        super().__init__()
        self.heads = tuple(heads)
        self.resolution = resolution
        self.config = {"channels": list(channels), "blocks": list(blocks), "feature_dim": feature_dim}
        layers, c_in = [], 3
        for i, (c, n) in enumerate(zip(channels, blocks, strict=True)):
            layers.append(conv_block(c_in, c, stride=1 if i == 0 else 2))
            layers += [conv_block(c, c) for _ in range(n - 1)]
            c_in = c
        self.body = torch.nn.Sequential(*layers)
        self.project = torch.nn.Sequential(
            torch.nn.Conv2d(c_in, feature_dim, 1), torch.nn.GroupNorm(8, feature_dim), torch.nn.SiLU()
        )
        self.classifiers = torch.nn.ModuleDict({h.name: torch.nn.Linear(feature_dim, len(h.classes)) for h in heads})

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` at `resolution`×`resolution` (antialiased bilinear), unchanged if it already is."""
        size = (self.resolution, self.resolution)
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features `(N, feature_dim)` of images in [-1, 1]."""
        return self.project(self.body(self.resize(x))).mean(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits `(N, classes)` of every head, from `features`."""
        return {name: head(features) for name, head in self.classifiers.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head for images in [-1, 1]."""
        return self.classify(self.features(x))


# --------------------------------------------------------------------------- the weights file


def default_weights_path() -> Path:
    """The file shipped inside the package."""
    return Path(str(resources.files("ldm_cli") / "evaluation" / "weights" / WEIGHTS_FILE))


def save_face_attribute_net(
    net: FaceAttributeNet, path: str | Path, training: dict[str, Any], accuracy: dict[str, float]
) -> Path:
    """Write the weights and JSON metadata as safetensors; equal inputs give equal bytes."""
    metadata = {
        "format": FORMAT,
        "faces_version": faces.VERSION,
        "heads": [{"name": h.name, "classes": list(h.classes)} for h in net.heads],
        "resolution": net.resolution,
        "architecture": net.config,
        "training": training,
        "heldout_accuracy": accuracy,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    data = save(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_bytes(sorted_metadata(data))
    return path


def sorted_metadata(data: bytes) -> bytes:
    """safetensors writes its metadata in a random order: sort it, keeping the header's length."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "re-encoded safetensors header grew"
    return data[:8] + text.ljust(length) + data[8 + length :]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a face-attribute weights file; CheckpointError if unreadable."""
    path = Path(path)
    what = f"face-attribute network '{path}'"
    if not path.is_file():
        raise CheckpointError(f"{what}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        metadata = {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{what}: not a readable safetensors file ({reason})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{what}: a safetensors file, but not a face-attribute network")
    return metadata


def load_face_attribute_net(path: str | Path | None = None) -> FaceAttributeNet:
    """The network of `path` (default: the packaged file), in eval mode on the CPU.

    Refuses, with a one-line CheckpointError, a file trained for another version of the
    faces generator than the one installed.
    """
    path = Path(path) if path is not None else default_weights_path()
    what = f"face-attribute network '{path}'"
    metadata = read_metadata(path)
    if metadata.get("faces_version") != faces.VERSION:
        raise CheckpointError(
            f"{what}: trained on faces generator version {metadata.get('faces_version')}, but the installed "
            f"generator is version {faces.VERSION}; retrain it with scripts/train_face_attributes.py"
        )
    try:
        heads = tuple(Head(h["name"], tuple(h["classes"])) for h in metadata["heads"])
        arch = metadata["architecture"]
        net = FaceAttributeNet(
            heads, tuple(arch["channels"]), tuple(arch["blocks"]), arch["feature_dim"], metadata["resolution"]
        )
        net.load_state_dict(load_file(str(path)))
    except (KeyError, TypeError, ValueError, SafetensorError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{what}: weights or metadata incomplete ({reason})") from None
    return net.eval()
