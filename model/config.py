"""Configuration of the CogVideoX VAE: one frozen dataclass built from a diffusers ``config.json``.

The allowlist below names every key of diffusers' ``AutoencoderKLCogVideoX`` config. Keys the model
uses are *handled*; bookkeeping keys that diffusers writes are *ignored*. Any other key is an error,
because a key we do not know about may change what the network computes. Every handled field's
type and range is checked when a ``VAEConfig`` is made (``_FIELD_CHECKS``), and all the problems
of a config are reported together, one per line, in one ``ConfigError``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["ConfigError", "VAEConfig", "PRESETS", "HANDLED_KEYS", "IGNORED_KEYS"]

DIFFUSERS_CLASS_NAME = "AutoencoderKLCogVideoX"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice raises (ValueError). Plain ``json`` (and
    so diffusers) keeps the last value silently, which makes which one was meant a guess; the
    safetensors headers and shard indexes are held to the same rule."""
    counts = collections.Counter(k for k, _ in pairs)
    dups = sorted(k for k, n in counts.items() if n > 1)
    if dups:
        raise ValueError(f"duplicate key(s) {', '.join(repr(k) for k in dups)} in one JSON object")
    return dict(pairs)


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

# diffusers' get_activation names (ACT2CLS); the resnets apply the one a config names
_ACTIVATIONS = ("swish", "silu", "mish", "gelu", "relu")


_DOWN_BLOCK = "CogVideoXDownBlock3D"
_UP_BLOCK = "CogVideoXUpBlock3D"


def _config_error(problems: list[str], source: str | None = None) -> ConfigError:
    """One ConfigError: a single problem on one line, several one per line; ``.problems`` lists them."""
    head = f"{source}: " if source else ""
    if len(problems) == 1:
        msg = f"{head}invalid CogVideoX VAE config: {problems[0]}"
    else:
        msg = f"{head}invalid CogVideoX VAE config, {len(problems)} problems:\n" + "\n".join(
            f"  - {p}" for p in problems
        )
    err = ConfigError(msg)
    err.problems = list(problems)
    return err


def _show(value: Any) -> str:
    """A value as config.json spells it (``true``, ``null``, ``"4"``, ``16.0``), else its repr."""
    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value, allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


def _is_int(v: Any) -> bool:  # a JSON integer: not a bool, not a float such as 16.0
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:  # a finite JSON number (an int is a valid float)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(float(v))  # (an int beyond a double's range overflows: not a number we can use)
    except OverflowError:
        return False


def _as_number(v: Any) -> Any:  # keep int/float as given (4 stays 4 in the exported config)
    return v if type(v) in (int, float) else (int(v) if isinstance(v, numbers.Integral) else float(v))


# Sizes are int64 in numpy and XLA: a larger JSON integer, which Python reads exactly, would only
# fail later, deep in flax's initialisers, as a traceback that does not name the field.
_INT_LIMIT = 2**63


def _int_at_least(v, low: int):
    if _is_int(v) and low <= v < _INT_LIMIT:
        return int(v), None
    if _is_int(v) and v >= _INT_LIMIT:
        return v, "must be below 2**63 (sizes are 64-bit integers)"
    return v, f"must be an integer >= {low}"


# Each check returns (normalized value, None) or (value, "what was expected").
def _positive_int(v):
    return _int_at_least(v, 1)


def _nonnegative_int(v):
    return _int_at_least(v, 0)


def _nonnegative_number(v):
    return (_as_number(v), None) if _is_number(v) and v >= 0 else (v, "must be a finite number >= 0")


def _flag(v):  # diffusers types force_upcast as a float (its default is True): a bool or a number
    return (v, None) if isinstance(v, bool) or _is_number(v) else (v, "must be true, false or a number")


def _positive_number(v):
    return (_as_number(v), None) if _is_number(v) and v > 0 else (v, "must be a finite number > 0")


def _optional_number(v):
    if v is None:
        return v, None
    return (_as_number(v), None) if _is_number(v) else (v, "must be null or a finite number")


def _optional_numbers(v):
    if v is None:
        return v, None
    if isinstance(v, (list, tuple)) and all(_is_number(x) for x in v):
        return tuple(_as_number(x) for x in v), None
    return v, "must be null or a list of finite numbers"


def _bool(v):
    return (v, None) if isinstance(v, bool) else (v, "must be true or false")


def _channels(v):
    if isinstance(v, (list, tuple)) and len(v) >= 1 and all(_is_int(x) and 1 <= x < _INT_LIMIT for x in v):
        return tuple(int(x) for x in v), None
    if isinstance(v, (list, tuple)) and any(_is_int(x) and x >= _INT_LIMIT for x in v):
        return v, "must be a non-empty list of integers >= 1 and below 2**63 (sizes are 64-bit integers)"
    return v, "must be a non-empty list of integers >= 1"


def _block_types(known: str):
    def check(v):
        if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            others = sorted({x for x in v if x != known})
            if not others:
                return tuple(v), None
            names = ", ".join(repr(x) for x in others)
            return v, f"unsupported block{'s' if len(others) > 1 else ''} {names} (only {known!r})"
        return v, f"must be a list of block type names ({known!r})"

    return check


def _act_fn(v):
    # diffusers' get_activation lowercases the name ("GELU", "SiLU" build); kept as given, so the
    # exported config.json says what the source's said
    if isinstance(v, str) and v.lower() in _ACTIVATIONS:
        return v, None
    if isinstance(v, str):
        return v, f"unsupported activation {v!r} (one of {', '.join(map(repr, _ACTIVATIONS))}, as diffusers)"
    return v, f"must be the name of an activation ({', '.join(map(repr, _ACTIVATIONS))})"


def _temporal_ratio(v):
    # diffusers uses int(log2(ratio)) temporal (de)compression levels; only a power of two means that
    if _is_number(v) and v > 0:
        level = math.log2(v)
        if level >= 0 and level == int(level):
            return _as_number(v), None
        return v, "must be a power of two (1, 2, 4, 8, ...)"
    return v, "must be a number that is a power of two (1, 2, 4, 8, ...)"


_FIELD_CHECKS = {
    "in_channels": _positive_int,
    "out_channels": _positive_int,
    "down_block_types": _block_types(_DOWN_BLOCK),
    "up_block_types": _block_types(_UP_BLOCK),
    "block_out_channels": _channels,
    "latent_channels": _positive_int,
    "layers_per_block": _nonnegative_int,  # 0: blocks without resnets, which diffusers builds and runs
    "act_fn": _act_fn,
    "norm_eps": _nonnegative_number,  # as diffusers: 0 is allowed
    "norm_num_groups": _positive_int,
    "temporal_compression_ratio": _temporal_ratio,
    "sample_height": _positive_int,
    "sample_width": _positive_int,
    "scaling_factor": _positive_number,
    "shift_factor": _optional_number,
    "latents_mean": _optional_numbers,
    "latents_std": _optional_numbers,
    "force_upcast": _flag,
    "use_quant_conv": _bool,
    "use_post_quant_conv": _bool,
    "invert_scale_latents": _bool,
}
assert set(_FIELD_CHECKS) == HANDLED_KEYS


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
    # diffusers' bookkeeping, not a setting: the diffusers version that wrote the source config,
    # written back on export (diffusers' save_pretrained always writes one). Not compared, hashed
    # or listed among the config's keys: two configs of one network are equal whoever wrote them.
    # Kept as written, unchecked (diffusers reads any value there).
    diffusers_version: Optional[Any] = dataclasses.field(default=None, compare=False, repr=False,
                                                         metadata={"bookkeeping": True})

    def __post_init__(self) -> None:
        """Check every field's type and range, then how the fields fit together; raise one
        ConfigError listing every problem. Lists become tuples (the config is hashable)."""
        problems: list[str] = []
        bad: set[str] = set()  # fields with a wrong type or range: the cross-field checks skip them
        for f in _settings():
            value = getattr(self, f.name)
            normalized, problem = _FIELD_CHECKS[f.name](value)
            if problem is not None:
                problems.append(f"{f.name}: {problem}, got {_show(value)}")
                bad.add(f.name)
            elif normalized is not value:
                object.__setattr__(self, f.name, normalized)

        n = None if "block_out_channels" in bad else len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            types = getattr(self, name)  # (a list naming an unsupported block still has a length)
            if n is not None and isinstance(types, (list, tuple)) and len(types) != n:
                problems.append(
                    f"{name}: has {len(types)} entries, but block_out_channels has {n} "
                    "(one block type per entry of block_out_channels)"
                )
        if not {"block_out_channels", "norm_num_groups"} & bad:
            odd = sorted({c for c in self.block_out_channels if c % self.norm_num_groups})
            if odd:
                problems.append(
                    f"block_out_channels: {', '.join(map(str, odd))} {'is' if len(odd) == 1 else 'are'} not "
                    f"divisible by norm_num_groups={self.norm_num_groups} (GroupNorm needs channels divisible "
                    "by groups)"
                )
        # diffusers builds quant_conv as Conv3d(2*out_channels, 2*out_channels) and post_quant_conv as
        # Conv3d(out_channels, out_channels), yet applies them to 2*latent_channels / latent_channels
        # tensors. Those shapes only work when the two counts are equal; anything else cannot run there.
        if (
            not {"use_quant_conv", "use_post_quant_conv", "latent_channels", "out_channels"} & bad
            and (self.use_quant_conv or self.use_post_quant_conv)
            and self.latent_channels != self.out_channels
        ):
            problems.append(
                "use_quant_conv/use_post_quant_conv need latent_channels == out_channels "
                f"(diffusers sizes them by out_channels; got latent_channels={self.latent_channels}, "
                f"out_channels={self.out_channels})"
            )
        if problems:
            raise _config_error(problems)

    # ------------------------------------------------------------------ derived values
    @property
    def temporal_compress_level(self) -> int:
        """Number of leading down/up blocks that also (de)compress time: log2(ratio)."""
        return int(math.log2(self.temporal_compression_ratio))

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def encode_problem(self) -> Optional[str]:
        """Why a model of this config cannot encode, or None. With ``layers_per_block=0`` the
        encoder's down blocks have no resnets, so nothing turns conv_in's ``block_out_channels[0]``
        channels into a later block's: diffusers builds such a model and decodes with it (its
        decoder blocks have one resnet more), but its encode fails deep in a GroupNorm or conv."""
        if self.layers_per_block == 0 and len(set(self.block_out_channels)) > 1:
            return (f"this VAE cannot encode: with layers_per_block=0 its encoder's blocks have no resnets to change the "
                    f"channels, so it runs only when block_out_channels are all equal (they are "
                    f"{list(self.block_out_channels)}); diffusers' encode fails on it too. Decoding works")
        return None

    # ------------------------------------------------------------------ diffusers interop
    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *, source: str = "config") -> "VAEConfig":
        """Build from a diffusers config dict. Another ``_class_name``, unknown keys and fields of a
        wrong type or out of range raise one ConfigError that names ``source`` and lists them all."""
        problems = []
        cls_name = config.get("_class_name")
        if cls_name is not None and cls_name != DIFFUSERS_CLASS_NAME:
            problems.append(f"_class_name is {cls_name!r}, not {DIFFUSERS_CLASS_NAME!r}: not a CogVideoX VAE")
        unknown = sorted((k for k in config if k not in HANDLED_KEYS and k not in IGNORED_KEYS), key=str)
        for k in unknown:
            problems.append(f"unknown config key {k!r}")
        if problems and cls_name is not None and cls_name != DIFFUSERS_CLASS_NAME:
            # another model's config: its field values would only add noise
            raise _config_error(problems, source)
        kwargs = {k: config[k] for k in HANDLED_KEYS if k in config}
        if config.get("_diffusers_version") is not None:
            kwargs["diffusers_version"] = config["_diffusers_version"]
        try:
            result = cls(**kwargs)
        except ConfigError as e:
            raise _config_error(problems + list(getattr(e, "problems", None) or [str(e)]), source) from None
        if problems:
            raise _config_error(problems, source)
        return result

    @classmethod
    def from_json_file(cls, path: str | Path, *, raw: Optional[bytes] = None) -> "VAEConfig":
        """``raw``: the file's bytes, already read (a converter hashes the very bytes it parsed)."""
        path = Path(path)
        try:
            raw = path.read_bytes() if raw is None else raw
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        try:  # UTF-8 whatever the locale, as diffusers reads it; every way to be unreadable is one error
            data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: cannot read config: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                              f"{e.start})") from None
        except RecursionError:
            raise ConfigError(f"{path}: cannot read config: JSON nested too deeply to read") from None
        except ValueError as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: config must be a JSON object")
        return cls.from_diffusers_config(data, source=str(path))

    @classmethod
    def from_json_file_ignoring_unknown(cls, path: str | Path, *,
                                        raw: Optional[bytes] = None) -> tuple["VAEConfig", Optional[ConfigError]]:
        """``from_json_file``, except that a config whose only problems are unknown keys gives the
        config without them, plus the ConfigError naming them (None when there is none): the
        architecture is still known, so a converter can check the weights against it and report
        the unknown keys and every tensor problem in one error. Any other problem raises."""
        try:
            raw = Path(path).read_bytes() if raw is None else raw  # read once: parsed twice below
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        try:
            return cls.from_json_file(path, raw=raw), None
        except ConfigError as e:
            problems = getattr(e, "problems", None) or []
            if not problems or not all(p.startswith("unknown config key ") for p in problems):
                raise
            data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
            known = {k: v for k, v in data.items() if k in HANDLED_KEYS or k in IGNORED_KEYS}
            return cls.from_diffusers_config(known, source=str(path)), e

    def to_diffusers_config(self) -> dict[str, Any]:
        """The config.json diffusers reads: ``_class_name``, ``_diffusers_version`` when known, and
        every setting (diffusers' save_pretrained writes the defaults of absent keys too)."""
        out: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS_NAME}
        if self.diffusers_version is not None:
            out["_diffusers_version"] = self.diffusers_version
        for f in _settings():
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes: Any) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    # diffusers' ``vae.config`` is a FrozenDict, read as ``config.scaling_factor`` (as here) and as
    # ``config["scaling_factor"]``, ``config.get(...)``, ``"key" in config``, ``dict(config)``,
    # ``config.items()``, ``len(config)``: the same readings work here, over the config's keys (the
    # fields). It stays read-only, as diffusers' is.
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in _settings())

    def __getitem__(self, key: str) -> Any:
        if isinstance(key, str) and key in self.keys():
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def values(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())

    def items(self) -> tuple[tuple[str, Any], ...]:
        return tuple((k, self[k]) for k in self.keys())

    def differences(self, other: "VAEConfig") -> list[str]:
        """The settings (config.json keys, in order) whose values differ from ``other``'s; the
        bookkeeping (which diffusers version wrote each file) is no setting."""
        return [k for k in self.keys() if self[k] != other[k]]


def _settings() -> tuple[dataclasses.Field, ...]:
    """VAEConfig's fields that are config.json settings (not bookkeeping such as the version)."""
    return tuple(f for f in dataclasses.fields(VAEConfig) if not f.metadata.get("bookkeeping"))


# The four published CogVideoX VAEs share one architecture; their configs differ only in the
# latent scaling (scaling_factor 1.15258426 for 2b, 0.7 otherwise; invert_scale_latents for 1.5).
PRESETS: dict[str, VAEConfig] = {
    "cogvideox-2b": VAEConfig(scaling_factor=1.15258426),
    "cogvideox-5b": VAEConfig(scaling_factor=0.7),
    "cogvideox-5b-i2v": VAEConfig(scaling_factor=0.7),
    "cogvideox1.5-5b": VAEConfig(scaling_factor=0.7, invert_scale_latents=True),
}
