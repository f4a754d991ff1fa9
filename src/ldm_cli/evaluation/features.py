"""Feature networks for `ldm evaluate`, loaded only from local files.

Which one `ldm evaluate` uses (`uses_face_network`): against `builtin:faces` with no
`--inception-weights`, `--features` or `--features-size`, the face-attribute network
shipped with the package (`ldm_cli.evaluation.face_quality`), so a fresh install can
score its samples; otherwise one of the two kinds below, both seen through
`FeatureNetwork`: give it uint8 images `(N, 3, H, W)` and it returns float32 features
`(N, D)` on the CPU.

torchvision's Inception v3 (the default)
    `torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)`
    with the weights of a local file, its 2048-d pool features (the input of `fc`).
    Images are resized to 299×299 (bilinear) and normalised with the ImageNet mean and
    standard deviation, as torchvision's transform for these weights does; the network
    is built with `transform_input=True`, as torchvision builds it for these weights.
    The file is `--inception-weights PATH`, or torchvision's own cache
    (`$TORCH_HOME/hub/checkpoints/inception_v3_google-0cc3c7bd.pth`, TORCH_HOME
    defaulting to ~/.cache/torch). Nothing is ever downloaded.

    This is NOT the Inception of the TensorFlow FID code (Heusel et al. 2017) that
    papers report: its weights and resizing differ, so numbers computed with it are
    comparable across ldm runs, but not with published FIDs. For those, pass the
    standard network as TorchScript through `--features`.

A TorchScript module (`--features PATH`)
    Any network saved with `torch.jit.save`. The contract: `forward` takes float32
    images in [0, 1] of shape `(N, 3, S, S)` and returns features `(N, D)`. `S` is
    `--features-size` when given (images are resized to it, bilinear), else the images'
    own resolution (the samples' side). A network with another interface is adapted by
    a small scripted wrapper, e.g. for the StyleGAN-distributed FID Inception, which
    wants values in [0, 255] and a keyword:

        class Adapter(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net
            def forward(self, x):
                return self.net(x * 255, return_features=True)

        torch.jit.save(torch.jit.script(Adapter(torch.jit.load("inception-2015-12-05.pt"))), "fid.pt")

    Loading TorchScript runs no pickled Python, but the module is a program: use
    files you trust.

Weights are read with `torch.load(..., weights_only=True)` (plain tensors only, never
arbitrary unpickling) or from a `.safetensors` file. Every problem with a file is a
one-line `UsageError` (exit code 2) that names it.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldm_cli.common.files import file_sha256
from ldm_cli.errors import UsageError

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


FACES_REFERENCE = "builtin:faces"


def uses_face_network(
    reference: str, inception_weights: Path | None, features: Path | None, features_size: int | None
) -> bool:
    """Whether `ldm evaluate` scores with the packaged face-attribute network: only against
    builtin:faces, and only when no flag chooses another feature network."""
    no_network_flags = inception_weights is None and features is None and features_size is None
    return reference.strip() == FACES_REFERENCE and no_network_flags


# --------------------------------------------------------------------------- the common interface


@dataclass
class FeatureNetwork:
    """A network that maps uint8 images to features, and what identifies it.

    `identity` changes whenever the features could: it hashes the weights file and the
    way images are fed, so it keys the cached reference statistics.
    """

    name: str
    identity: str
    module: torch.nn.Module
    input_size: int | None  # side images are resized to; None: fed at their own size
    normalize: bool  # ImageNet mean/std after scaling to [0, 1]
    device: torch.device
    source: Path  # the file it came from, for messages

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `(N, 3, H, W)` → the float32 batch the module expects, on its device."""
        x = images.to(self.device, torch.float32) / 255.0
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features `(N, D)`, float32 on the CPU, of a uint8 batch `(N, 3, H, W)`."""
        x = self.prepare(images)
        try:
            out = self.module(x)
        except Exception as err:  # a scripted module raises whatever its code raises
            raise UsageError(
                f"features network '{self.source}': failed on a batch of shape {tuple(x.shape)} "
                f"({first_line(err)}); check --features-size and the input contract (floats in [0, 1])"
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(images):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(
                f"features network '{self.source}': returned {shape} for {len(images)} images; "
                "expected a tensor of shape (N, D)"
            )
        return out.float().cpu()


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def check_file(path: Path, what: str) -> None:
    """Exit 2 unless `path` is an existing regular file."""
    if not path.exists():
        raise UsageError(f"{what} '{path}': no such file")
    if not path.is_file():
        raise UsageError(f"{what} '{path}': is not a file")


# --------------------------------------------------------------------------- Inception v3


def default_inception_path() -> Path:
    """Where torchvision caches these weights: `$TORCH_HOME/hub/checkpoints/…` (~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(path: Path | None) -> Path:
    """The weights file to use: `path` if given, else torchvision's cache; exit 2 if absent."""
    if path is not None:
        check_file(path, "inception weights")
        return path
    default = default_inception_path()
    if not default.is_file():
        raise UsageError(
            f"Inception weights not found at '{default}'; download {INCEPTION_FILE} ({INCEPTION_URL}) "
            "on a machine with internet and pass --inception-weights PATH (or copy it there), "
            "or pass --features for another feature network"
        )
    return default


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `torch.save` file loaded with `weights_only=True`."""
    what = f"inception weights '{path}'"
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UsageError(f"{what}: not a readable safetensors file ({first_line(err)})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"{what}: refused; it is a pickle that holds more than plain tensors "
            "(ldm loads weights with torch.load(weights_only=True) and never runs pickled code)"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, … for files that are not checkpoints
        raise UsageError(f"{what}: not a readable PyTorch weights file ({first_line(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{what}: does not hold a state dict of tensors")
    return state


def build_inception(state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """torchvision's Inception v3 with `state` loaded and `fc` removed: 2048-d pool features."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        reason = first_line(err)
        raise UsageError(f"inception weights '{path}': not torchvision Inception v3 weights ({reason})") from None
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UsageError(
            f"inception weights '{path}': not torchvision Inception v3 weights "
            f"({len(missing)} missing and {len(unexpected)} unexpected tensors, e.g. {example!r})"
        )
    model.fc = torch.nn.Identity()
    return model.eval()


def load_inception(path: Path | None, device: torch.device) -> FeatureNetwork:
    """torchvision's Inception v3 pool features, weights from `path` or torchvision's cache."""
    path = find_inception_weights(path)
    model = build_inception(read_state_dict(path), path)
    identity = f"torchvision-inception-v3:{file_sha256(path)}:{INCEPTION_SIZE}:imagenet-norm"
    return FeatureNetwork("inception-v3 (torchvision)", identity, model.to(device), INCEPTION_SIZE,
                          normalize=True, device=device, source=path)


# --------------------------------------------------------------------------- TorchScript


def load_scripted(path: Path, input_size: int | None, device: torch.device) -> FeatureNetwork:
    """A TorchScript module mapping [0, 1] images `(N, 3, S, S)` to features `(N, D)`."""
    check_file(path, "features network")
    if input_size is not None and input_size < 1:
        raise UsageError(f"--features-size {input_size}: must be at least 1")
    try:
        with warnings.catch_warnings():  # TorchScript's deprecation notice is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # RuntimeError / ValueError for anything that is not TorchScript
        raise UsageError(
            f"features network '{path}': not a TorchScript file ({first_line(err)}); "
            "save the network with torch.jit.save(torch.jit.script(model), PATH)"
        ) from None
    identity = f"torchscript:{file_sha256(path)}:{input_size or 'native'}"
    name = f"torchscript {path.name}" + (f" @{input_size}px" if input_size else "")
    return FeatureNetwork(name, identity, module.eval(), input_size, normalize=False, device=device, source=path)


def load_feature_network(
    inception_weights: Path | None, features: Path | None, features_size: int | None, device: torch.device
) -> FeatureNetwork:
    """The network `ldm evaluate` uses: `--features` if given, else Inception v3."""
    if features is not None and inception_weights is not None:
        raise UsageError("--features and --inception-weights choose the feature network; pass only one")
    if features is not None:
        return load_scripted(Path(features), features_size, device)
    if features_size is not None:
        raise UsageError("--features-size applies to a --features network only (Inception always uses 299px)")
    return load_inception(Path(inception_weights) if inception_weights is not None else None, device)

