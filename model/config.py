"""Configuration of the CogVideoX VAE: one frozen dataclass built from a diffusers ``config.json``.

The allowlist below names every key of diffusers' ``AutoencoderKLCogVideoX`` config. Keys the model
uses are *handled*; bookkeeping keys that diffusers writes are *ignored*. Any other key is an error,
because a key we do not know about may change what the network computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ConfigError", "VAEConfig", "PRESETS", "HANDLED_KEYS", "IGNORED_KEYS"]

DIFFUSERS_CLASS_NAME = "AutoencoderKLCogVideoX"


class ConfigError(ValueError):
    """A diffusers config that this model cannot represent exactly."""


# Keys that change the computation or are carried through to the exported config.
HANDLED_KEYS = frozenset(
    {
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "latent_channels",
        "layers_per_block",
        "act_fn",
        "norm_eps",
        "norm_num_groups",
        "temporal_compression_ratio",
        "sample_height",
        "sample_width",
        "scaling_factor",
        "shift_factor",
        "latents_mean",
        "latents_std",
        "force_upcast",
        "use_quant_conv",
        "use_post_quant_conv",
        "invert_scale_latents",
    }
)
# Bookkeeping that diffusers' ConfigMixin writes; it does not affect the network.
IGNORED_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})

_ACTIVATIONS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent-scaling settings of ``AutoencoderKLCogVideoX`` (diffusers defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self) -> None:
        problems = []
        n = len(self.block_out_channels)
        if n < 1:
            problems.append("block_out_channels must not be empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(
                f"down_block_types ({len(self.down_block_types)}) and up_block_types ({len(self.up_block_types)}) "
                f"must have one entry per block_out_channels ({n})"
            )
        for t in self.down_block_types:
            if t != "CogVideoXDownBlock3D":
                problems.append(f"down_block_types: unsupported block {t!r} (only 'CogVideoXDownBlock3D')")
        for t in self.up_block_types:
            if t != "CogVideoXUpBlock3D":
                problems.append(f"up_block_types: unsupported block {t!r} (only 'CogVideoXUpBlock3D')")
        if self.act_fn not in _ACTIVATIONS:
            problems.append(f"act_fn: unsupported activation {self.act_fn!r} (only 'silu'/'swish')")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                problems.append(f"block_out_channels: {c} is not divisible by norm_num_groups={self.norm_num_groups}")
        level = math.log2(self.temporal_compression_ratio) if self.temporal_compression_ratio > 0 else -1
        if level < 0 or level != int(level):
            problems.append(f"temporal_compression_ratio must be a power of two, got {self.temporal_compression_ratio}")
        # diffusers builds quant_conv as Conv3d(2*out_channels, 2*out_channels) and post_quant_conv as
        # Conv3d(out_channels, out_channels), yet applies them to 2*latent_channels / latent_channels
        # tensors. Those shapes only work when the two counts are equal; anything else cannot run there.
        if (self.use_quant_conv or self.use_post_quant_conv) and self.latent_channels != self.out_channels:
            problems.append(
                "use_quant_conv/use_post_quant_conv need latent_channels == out_channels "
                f"(diffusers sizes them by out_channels; got latent_channels={self.latent_channels}, "
                f"out_channels={self.out_channels})"
            )
        if problems:
            raise ConfigError("invalid CogVideoX VAE config:\n  " + "\n  ".join(problems))

    # ------------------------------------------------------------------ derived values
    @property
    def temporal_compress_level(self) -> int:
        """Number of leading down/up blocks that also (de)compress time: log2(ratio)."""
        return int(math.log2(self.temporal_compression_ratio))

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    # ------------------------------------------------------------------ diffusers interop
    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *, source: str = "config") -> "VAEConfig":
        """Build from a diffusers config dict; unknown keys or another ``_class_name`` raise ConfigError."""
        problems = []
        cls_name = config.get("_class_name")
        if cls_name is not None and cls_name != DIFFUSERS_CLASS_NAME:
            problems.append(f"_class_name is {cls_name!r}, not {DIFFUSERS_CLASS_NAME!r}: not a CogVideoX VAE")
        unknown = sorted(k for k in config if k not in HANDLED_KEYS and k not in IGNORED_KEYS)
        for k in unknown:
            problems.append(f"unknown config key {k!r}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        kwargs = {}
        for k in HANDLED_KEYS:
            if k not in config:
                continue
            v = config[k]
            if isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "VAEConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: config must be a JSON object")
        return cls.from_diffusers_config(data, source=str(path))

    def to_diffusers_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS_NAME}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes: Any) -> "VAEConfig":
        return dataclasses.replace(self, **changes)


# The four published CogVideoX VAEs share one architecture; their configs differ only in the
# latent scaling (scaling_factor 1.15258426 for 2b, 0.7 otherwise; invert_scale_latents for 1.5).
PRESETS: dict[str, VAEConfig] = {
    "cogvideox-2b": VAEConfig(scaling_factor=1.15258426),
    "cogvideox-5b": VAEConfig(scaling_factor=0.7),
    "cogvideox-5b-i2v": VAEConfig(scaling_factor=0.7),
    "cogvideox1.5-5b": VAEConfig(scaling_factor=0.7, invert_scale_latents=True),
}
