"""Every setting of `ldm`, as pydantic models loaded from TOML with `--set` overrides.

A config file has one table per section (`[data]`, `[model]`, `[loss]`, `[optim]`,
`[train]`, `[logging]`, `[output]`, and for the denoiser `[diffusion]` and
`[latents]`). Unknown keys are errors. `--set section.key=value` overrides any value;
the value is read as a TOML value (`--set train.max_steps=200`,
`--set model.channel_mults=[1,2,4]`, `--set data.source=builtin:faces`) and falls
back to a plain string. Every problem becomes one line naming the file, the dotted key
and what was expected (`ConfigError`, exit code 2).
"""

from __future__ import annotations

import math
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ldm_cli.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

OFF_WORDS = ("none", "off")  # how TOML and --set turn an optional setting off (TOML has no null)
INT64 = 2**63
SEED_MAX = 2**32 - 1  # every seed derived from a seed (× 1 000 003 + index) then fits in 64 bits


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values re-validated on set,
    floats finite, integers within 64 bits, and "none" (or "off") turns an optional
    setting off."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _off_means_none(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        optional = field is not None and type(None) in get_args(field.annotation)
        if optional and isinstance(value, str) and value.strip().lower() in OFF_WORDS:
            return None
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _int_fits_64_bits(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
            raise ValueError("must fit in 64 bits")
        return value


# --------------------------------------------------------------------------- sections


class DataConfig(Section):
    """Where images come from and how they are prepared (see `ldm_cli.data`)."""

    source: str = Field("builtin:faces", description="image folder, .zip of images, or builtin:faces")
    resolution: int = Field(32, ge=8, le=4096, description="side of the square training image")
    builtin_size: int = Field(4096, ge=2, description="number of images builtin:faces draws")
    holdout_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share never trained on")
    flip: bool = Field(True, description="random horizontal flips during training")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="fixes builtin:faces and the held-out split")
    cache_dir: str | None = Field(None, description="uint8 cache folder; default $LDM_CACHE_DIR or ~/.cache/ldm")


AdamBeta = Annotated[float, Field(ge=0.0, lt=1.0)]  # each of Adam's (β1, β2)


class OptimConfig(Section):
    """AdamW with linear warmup, then a constant or cosine learning rate."""

    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.99)
    adam_eps: float = Field(1e-8, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr / lr for cosine")
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    fused: bool = Field(True, description="torch's fused AdamW kernel (one pass over all parameters)")


class TrainConfig(Section):
    """How long and how the shared training loop runs (see `ldm_cli.training.loop`)."""

    max_steps: int = Field(2000, gt=0, description="optimizer updates")
    batch_size: int = Field(64, gt=0, description="GLOBAL batch per update, over all processes and accumulation")
    grad_accum_steps: int = Field(1, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "auto", description="auto: bf16 on CUDA GPUs that support it, else no"
    )
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="EMA of the weights; 0 disables it")
    ema_gamma: float = Field(8.0, gt=0.0, description="EMA warm-up d_k = min(d, (1+k)/(γ+2+k)): larger, shorter average")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="channels-last memory format (auto: on, except for the VAE on a CPU)")
    tf32: Literal["auto", "on", "off"] = Field("auto", description="TF32 matmuls and convolutions (auto: on CUDA)")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the model (auto: on CUDA)")


class LoggingConfig(Section):
    """When the loop prints, checkpoints and draws."""

    log_every: int = Field(50, gt=0, description="plain log line every N steps when not on a terminal")
    checkpoint_every: int = Field(500, gt=0)
    preview_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0, description="newest resumable states kept")
    max_nonfinite_in_row: int = Field(5, gt=0, description="stop after this many non-finite losses in a row")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="experiment trackers (Accelerate's): tensorboard, wandb"
    )


class OutputConfig(Section):
    dir: str = "runs/vae"


class VAEModelConfig(Section):
    """Convolutional β-VAE: residual encoder/decoder, diagonal Gaussian posterior."""

    base_channels: int = Field(64, gt=0)
    channel_mults: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per level")
    downsample_factor: int = Field(4, ge=1, description="image side / latent side; 2**(levels-1)")
    latent_channels: int = Field(4, gt=0)
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    @model_validator(mode="after")
    def _levels_match_factor(self) -> "VAEModelConfig":
        levels = math.log2(self.downsample_factor) + 1
        if levels != len(self.channel_mults):
            raise ValueError(
                f"downsample_factor {self.downsample_factor} needs {int(levels) if levels.is_integer() else 'a power of 2'}"
                f" levels, but channel_mults has {len(self.channel_mults)}"
            )
        if any(m <= 0 for m in self.channel_mults):
            raise ValueError("channel_mults must be positive")
        return self


class VAELossConfig(Section):
    """Loss = reconstruction + β·KL, β decaying from beta_start to beta_final."""

    reconstruction: Literal["l1", "mse"] = "l1"
    structural: Literal["ssim", "ms-ssim"] = "ssim"
    structural_weight: float = Field(0.0, ge=0.0, description="weight of (1 - SSIM), mixed with reconstruction")
    beta_start: float = Field(1e-3, ge=0.0)
    beta_final: float = Field(1e-5, ge=0.0)
    beta_decay_steps: int = Field(1000, ge=0)
    beta_decay_shape: Literal["linear", "cosine", "exponential"] = "cosine"

    @model_validator(mode="after")
    def _exponential_needs_positive(self) -> "VAELossConfig":
        if self.beta_decay_shape == "exponential" and (self.beta_start <= 0 or self.beta_final <= 0):
            raise ValueError("exponential beta decay needs beta_start > 0 and beta_final > 0")
        return self


class UNetConfig(Section):
    """ConvNeXt U-Net over latents (see `ldm_cli.models.unet`)."""

    latent_channels: int = Field(4, gt=0, description="must equal the VAE's latent channels")
    latent_size: int = Field(8, gt=0, description="must equal image resolution / VAE downsample factor")
    base_channels: int = Field(64, gt=0)
    channel_mults: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    blocks_per_level: int = Field(2, ge=1)
    attention_levels: list[int] = Field(default_factory=list, description="levels (0 = full size) with self-attention")
    attention_heads: int = Field(4, gt=0)
    mlp_ratio: int = Field(4, gt=0)
    layer_scale_init: float = Field(1e-6, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    self_condition: bool = Field(
        False, description="also feed the network its previous estimate of z0 (Chen et al. 2023, self-conditioning)")

    @model_validator(mode="after")
    def _levels_fit(self) -> "UNetConfig":
        levels = len(self.channel_mults)
        if self.latent_size % (2 ** (levels - 1)):
            raise ValueError(
                f"latent_size {self.latent_size} is not divisible by 2**(levels-1) = {2 ** (levels - 1)}"
            )
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{levels - 1}")
        for lvl in self.attention_levels:
            width = self.base_channels * self.channel_mults[lvl]
            if width % self.attention_heads:
                raise ValueError(f"level {lvl} has {width} channels, not divisible by attention_heads {self.attention_heads}")
        return self


class DiffusionConfig(Section):
    """The forward noising process (see `ldm_cli.diffusion.schedules`)."""

    schedule: Literal["linear", "cosine", "sigmoid"] = "cosine"
    timesteps: int = Field(1000, ge=1, le=100_000)
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    min_snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR-γ loss weighting; \"none\" to disable")
    timestep_sampling: Literal["uniform", "logit-normal"] = Field(
        "uniform", description="how training draws t: uniform, or logit-normal around T/2 (Esser et al. 2024)")
    input_scale: float = Field(1.0, gt=0.0, le=10.0, description="b of Chen 2023: latents normalised to std b, "
                               "so b < 1 noises more at every t")

    @model_validator(mode="after")
    def _linear_betas_increase(self) -> "DiffusionConfig":
        if self.schedule == "linear" and self.beta_start > self.beta_end:
            raise ValueError(f"linear schedule needs beta_start <= beta_end, got {self.beta_start} > {self.beta_end}")
        return self


class QualityConfig(Section):
    """Sample quality measured while the denoiser trains (builtin:faces data only): every
    `every` updates, `samples` DDIM samples of the EMA model are scored like `ldm evaluate`
    does — FD and legibility in the face-attribute network's features."""

    every: int = Field(0, ge=0, description="measure every N updates; 0 turns it off")
    samples: int = Field(256, ge=8, description="samples per measurement")
    steps: int = Field(10, ge=1, description="DDIM steps of those samples")


class LatentsConfig(Section):
    """Which VAE makes the latents, and whether they are cached."""

    vae: str | None = Field(None, description="path to vae.safetensors (or give --vae)")
    cache: bool = Field(True, description="encode the training set once and train from the cache")
    encode_batch_size: int = Field(64, gt=0)


# --------------------------------------------------------------------------- run configs


class RunConfig(Section):
    """What every training run reads: its data, and how the shared loop optimises, logs
    and writes. Each task adds its model (and loss or diffusion) sections."""

    task_name: ClassVar[str]  # names the exported file: f"{task_name}.safetensors"

    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    output: OutputConfig = OutputConfig()


class VAERunConfig(RunConfig):
    """Everything `ldm train-vae` reads."""

    task_name: ClassVar[str] = "vae"
    model: VAEModelConfig = VAEModelConfig()
    loss: VAELossConfig = VAELossConfig()
    output: OutputConfig = OutputConfig(dir="runs/vae")

    @model_validator(mode="after")
    def _resolution_fits_the_vae(self) -> "VAERunConfig":
        factor = self.model.downsample_factor
        if self.data.resolution % factor:
            raise ValueError(f"data.resolution {self.data.resolution} is not divisible by model.downsample_factor "
                             f"{factor}; use a multiple of {factor}")
        return self


class DenoiserRunConfig(RunConfig):
    """Everything `ldm train-denoiser` reads."""

    task_name: ClassVar[str] = "denoiser"
    model: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    latents: LatentsConfig = LatentsConfig()
    quality: QualityConfig = QualityConfig()
    output: OutputConfig = OutputConfig(dir="runs/denoiser")


RunConfigT = TypeVar("RunConfigT", VAERunConfig, DenoiserRunConfig)
SECTION_ORDER = ("data", "model", "loss", "diffusion", "latents", "quality", "optim", "train", "logging", "output")


# --------------------------------------------------------------------------- loading


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package, e.g. `quickstart/vae.toml`."""
    return Path(str(resources.files("ldm_cli") / "configs" / name))


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a one-line `ConfigError`."""
    if path.is_dir():
        raise ConfigError([f"{path}: is a folder, not a config file"])
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: not valid TOML: {err}"]) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its dotted path and a TOML-typed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"--set {text!r}: expected section.key=value"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as builtin:faces or a path
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str], schema: type[BaseModel]) -> dict[str, Any]:
    """Set each `--set` value in the raw dict, refusing keys the schema does not have."""
    problems = []
    for text in overrides:
        path, value = parse_override(text)
        model: type[BaseModel] | None = schema
        node = raw
        for i, part in enumerate(path):
            field = model.model_fields.get(part) if model is not None else None
            if field is None:
                problems.append(f"--set {'.'.join(path)}: no such key (known: {', '.join(model.model_fields) if model else 'none'})")
                break
            is_last = i == len(path) - 1
            annotation = field.annotation
            sub = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if is_last:
                if sub is not None:
                    problems.append(f"--set {'.'.join(path)}: is a section; name a key inside it")
                else:
                    node[part] = value
                break
            if sub is None:
                problems.append(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
                break
            node = node.setdefault(part, {})
            model = sub
    if problems:
        raise ConfigError(problems)
    return raw


def format_validation_error(err: ValidationError, origin: str, overridden: set[str] = frozenset()) -> list[str]:
    """One line per problem: `origin: dotted.key: what was expected (got value)`, where
    origin is the file, or "command line" for a key set by --set or a flag."""
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        got = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        where = "command line" if key in overridden else origin
        lines.append(f"{where}: {key}: {message}{shown}")
    return lines


def load_config(
    schema: type[RunConfigT], path: Path | None, overrides: list[str] = (), updates: dict[str, Any] | None = None
) -> RunConfigT:
    """Load `path` (or the schema's defaults when None), apply `--set` overrides, then
    the dotted-key `updates` of plain flags such as --out or --max-steps, and validate."""
    raw = read_toml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides), schema)
    for dotted, value in (updates or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    overridden = {".".join(parse_override(text)[0]) for text in overrides} | set(updates or {})
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        origin = str(path) if path is not None else "defaults"
        raise ConfigError(format_validation_error(err, origin, overridden)) from None


def to_toml(config: BaseModel) -> str:
    """The resolved config as TOML text, sections in the order of the packaged configs.
    TOML has no null: a setting that is off is written as "none", which loads back as off."""
    dumped = config.model_dump(mode="json")
    ordered = {key: dumped[key] for key in sorted(dumped, key=lambda k: SECTION_ORDER.index(k)
                                                  if k in SECTION_ORDER else len(SECTION_ORDER))}
    return tomli_w.dumps(_none_as_off(ordered))


def _none_as_off(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _none_as_off(v) for k, v in value.items()}
    return OFF_WORDS[0] if value is None else value
