"""VAEConfig: built from diffusers configs with an allowlist; anything else is a clear error."""

import json
import math
import os
import re
import shutil
import subprocess

import pytest

from _scripts import script
from cogvae.model import HANDLED_KEYS, IGNORED_KEYS, PRESETS, ConfigError, VAEConfig


def test_real_diffusers_config_round_trips():
    from diffusers import AutoencoderKLCogVideoX

    cfg = dict(AutoencoderKLCogVideoX().config)
    ours = VAEConfig.from_diffusers_config(cfg)
    assert ours == PRESETS["cogvideox-2b"]
    back = ours.to_diffusers_config()
    for k in HANDLED_KEYS:
        want = cfg[k]
        assert back[k] == (list(want) if isinstance(want, tuple) else want), k
    # every key diffusers writes is known to the allowlist
    assert set(cfg) <= HANDLED_KEYS | IGNORED_KEYS


def test_unknown_config_key_is_an_error_naming_it():
    cfg = PRESETS["cogvideox-2b"].to_diffusers_config() | {"mid_block_add_attention": True}
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'mid_block_add_attention'")):
        VAEConfig.from_diffusers_config(cfg, source="vae/config.json")


def test_a_key_given_twice_in_config_json_is_an_error(tmp_path):
    """Plain JSON readers (and diffusers) keep the last of two values silently; which was meant is
    a guess, so both keys are named (safetensors headers and indexes are refused the same way)."""
    path = tmp_path / "config.json"
    path.write_text('{"_class_name": "AutoencoderKL", "_class_name": "AutoencoderKLCogVideoX", '
                    '"latent_channels": 8, "latent_channels": 16}')
    for read in (VAEConfig.from_json_file, VAEConfig.from_json_file_ignoring_unknown):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read config: duplicate key(s) "
                                                        "'_class_name', 'latent_channels'")):
            read(path)


def test_the_writers_diffusers_version_is_kept_as_written_and_never_compared(tmp_path):
    """Bookkeeping, not a setting: kept (any value diffusers reads, a number too) for the exported
    config.json, and two configs of one network are equal whichever diffusers wrote them."""
    for version in ("0.30.0.dev0", 0.3):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(PUBLISHED["cogvideox-2b"] | {"_diffusers_version": version}))
        cfg = VAEConfig.from_json_file(path)
        assert cfg.diffusers_version == version and cfg.to_diffusers_config()["_diffusers_version"] == version
        assert cfg == PRESETS["cogvideox-2b"] and hash(cfg) == hash(PRESETS["cogvideox-2b"])
        assert "diffusers_version" not in cfg and "_diffusers_version" not in cfg.keys()
        assert cfg.replace(scaling_factor=0.7).diffusers_version == version
    assert "_diffusers_version" not in PRESETS["cogvideox-2b"].to_diffusers_config()


def test_other_model_class_is_an_error():
    cfg = {"_class_name": "AutoencoderKL", "in_channels": 3}
    with pytest.raises(ConfigError, match="'AutoencoderKL', not 'AutoencoderKLCogVideoX': not a CogVideoX VAE"):
        VAEConfig.from_diffusers_config(cfg)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(latent_channels=16, use_quant_conv=True), "need latent_channels == out_channels"),
        (dict(latent_channels=16, use_post_quant_conv=True), "need latent_channels == out_channels"),
        (dict(act_fn="tanh"), "unsupported activation 'tanh' (one of 'swish', 'silu', 'mish', 'gelu', 'relu'"),
        (dict(norm_num_groups=5), "not divisible by norm_num_groups=5"),
        (dict(norm_num_groups=3, block_out_channels=(6, 8, 9, 10)), "8, 10 are not divisible by norm_num_groups=3"),
        (dict(block_out_channels=(128, 256)), "down_block_types: has 4 entries, but block_out_channels has 2"),
        (dict(down_block_types=("DownEncoderBlock2D",) * 4), "unsupported block 'DownEncoderBlock2D'"),
        (dict(temporal_compression_ratio=3), "must be a power of two"),
    ],
)
def test_unsupported_configs_are_errors(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PRESETS["cogvideox-2b"].replace(**changes)


def test_presets_differ_only_in_latent_scaling():
    base = PRESETS["cogvideox-2b"]
    assert base.scaling_factor == 1.15258426 and not base.invert_scale_latents
    for name in ("cogvideox-5b", "cogvideox-5b-i2v"):
        assert PRESETS[name] == base.replace(scaling_factor=0.7)
    assert PRESETS["cogvideox1.5-5b"] == base.replace(scaling_factor=0.7, invert_scale_latents=True)


def test_latent_scaling_helpers():
    import jax.numpy as jnp

    from cogvae.model import abstract_model

    z = jnp.ones((1, 1, 1, 1, 16))
    m = abstract_model(PRESETS["cogvideox1.5-5b"])
    assert float(m.scale_latents(z)[0, 0, 0, 0, 0]) == pytest.approx(0.7)
    assert float(m.scale_latents(z, image_latents=True)[0, 0, 0, 0, 0]) == pytest.approx(1 / 0.7)
    assert float(m.unscale_latents(z)[0, 0, 0, 0, 0]) == pytest.approx(1 / 0.7)
    m2 = abstract_model(PRESETS["cogvideox-2b"])
    assert float(m2.scale_latents(z, image_latents=True)[0, 0, 0, 0, 0]) == pytest.approx(1.15258426)


# ---------------------------------------------------------------------------------------------
# field types and ranges
# ---------------------------------------------------------------------------------------------

_DOWN = ["CogVideoXDownBlock3D"] * 4
_UP = ["CogVideoXUpBlock3D"] * 4


def _published(scaling_factor, version, **extra):
    """A vae/config.json as THUDM publishes it (same keys, same JSON types)."""
    cfg = {
        "_class_name": "AutoencoderKLCogVideoX",
        "_diffusers_version": version,
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 512],
        "down_block_types": _DOWN,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 3,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_height": 480,
        "sample_width": 720,
        "scaling_factor": scaling_factor,
        "shift_factor": None,
        "temporal_compression_ratio": 4,
        "up_block_types": _UP,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }
    return json.loads(json.dumps(cfg | extra))


PUBLISHED = {
    "cogvideox-2b": _published(1.15258426, "0.30.0.dev0"),
    "cogvideox-5b": _published(0.7, "0.31.0.dev0"),
    "cogvideox-5b-i2v": _published(0.7, "0.31.0.dev0"),
    "cogvideox1.5-5b": _published(0.7, "0.32.0.dev0", invert_scale_latents=True),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_pass(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED[name], indent=2))
    cfg = VAEConfig.from_json_file(path)
    assert cfg == PRESETS[name] and hash(cfg) == hash(PRESETS[name])
    assert cfg.block_out_channels == (128, 256, 256, 512) and isinstance(cfg.down_block_types, tuple)
    # the exported config keeps the JSON types (4 stays an int)
    assert json.dumps(cfg.to_diffusers_config()["temporal_compression_ratio"]) == "4"


@pytest.mark.parametrize(
    "changes",
    [
        {"scaling_factor": 1},  # a float given as a JSON int
        {"norm_eps": 1, "shift_factor": 0},
        {"shift_factor": 0.0609},
        {"temporal_compression_ratio": 4.0},
        {"temporal_compression_ratio": 1},
        {"temporal_compression_ratio": 8},
        {"latents_mean": [0, 0.5, -1.25, 3] * 4, "latents_std": [1.0] * 16},
        {"latents_mean": [], "latents_std": None},
        {"act_fn": "swish"},
        {"act_fn": "SiLU"},  # diffusers' get_activation lowercases it; kept as given
        {"sample_height": 1, "sample_width": 1},
        {"norm_num_groups": 1},
        {"block_out_channels": [32, 64], "down_block_types": _DOWN[:2], "up_block_types": _UP[:2]},
        {"latent_channels": 3, "use_quant_conv": True, "use_post_quant_conv": True},
        {"force_upcast": False, "invert_scale_latents": True},
        {"force_upcast": 1.0},  # diffusers types it as a float
        {"layers_per_block": 0, "norm_eps": 0},  # diffusers builds and runs both
    ],
    ids=lambda c: ",".join(f"{k}={json.dumps(v)[:12]}" for k, v in c.items()),
)
def test_valid_field_values_are_accepted(changes):
    cfg = VAEConfig.from_diffusers_config(PUBLISHED["cogvideox-2b"] | changes)
    back = cfg.to_diffusers_config()
    for k, v in changes.items():
        assert back[k] == v, k
    hash(cfg)  # every list became a tuple


BAD_FIELDS = [
    ("norm_num_groups", 0, "0"),
    ("norm_num_groups", -32, "-32"),
    ("norm_num_groups", 32.0, "32.0"),
    ("norm_num_groups", True, "true"),
    ("block_out_channels", 8, "8"),
    ("block_out_channels", None, "null"),
    ("block_out_channels", [], "[]"),
    ("block_out_channels", [128, 256, 256, 512.0], "[128, 256, 256, 512.0]"),
    ("block_out_channels", [128, 0, 256, 512], "[128, 0, 256, 512]"),
    ("down_block_types", None, "null"),
    ("down_block_types", "CogVideoXDownBlock3D", '"CogVideoXDownBlock3D"'),
    ("up_block_types", [1, 2, 3, 4], "[1, 2, 3, 4]"),
    ("temporal_compression_ratio", "4", '"4"'),
    ("temporal_compression_ratio", True, "true"),
    ("temporal_compression_ratio", 0, "0"),
    ("temporal_compression_ratio", 0.5, "0.5"),
    ("temporal_compression_ratio", math.inf, "Infinity"),
    ("layers_per_block", "1", '"1"'),
    ("layers_per_block", -1, "-1"),
    ("layers_per_block", 3.0, "3.0"),
    ("latent_channels", 16.0, "16.0"),
    # beyond int64 (Python reads any JSON integer exactly): was a traceback from flax's initialisers
    ("in_channels", 10**30, str(10**30)),
    ("latent_channels", 2**64, str(2**64)),
    ("layers_per_block", 2**63, str(2**63)),
    ("block_out_channels", [128, 2**63, 256, 512], f"[128, {2**63}, 256, 512]"),
    ("scaling_factor", 10**400, str(10**400)),
    ("latent_channels", "16", '"16"'),
    ("in_channels", True, "true"),
    ("out_channels", 0, "0"),
    ("sample_height", "480", '"480"'),
    ("sample_width", None, "null"),
    ("sample_width", 720.0, "720.0"),
    ("norm_eps", "x", '"x"'),
    ("norm_eps", -1e-6, "-1e-06"),
    ("norm_eps", math.nan, "NaN"),
    ("norm_eps", None, "null"),
    ("scaling_factor", "x", '"x"'),
    ("scaling_factor", 0, "0"),
    ("scaling_factor", None, "null"),
    ("scaling_factor", False, "false"),
    ("shift_factor", "0", '"0"'),
    ("latents_mean", "abc", '"abc"'),
    ("latents_mean", [0.1, "0.2"], '[0.1, "0.2"]'),
    ("latents_std", [1.0, None], "[1.0, null]"),
    ("latents_std", {"a": 1}, '{"a": 1}'),
    ("force_upcast", "no", '"no"'),
    ("use_quant_conv", None, "null"),
    ("use_post_quant_conv", "false", '"false"'),
    ("invert_scale_latents", 0, "0"),
    ("act_fn", None, "null"),
    ("act_fn", 1, "1"),
]


@pytest.mark.parametrize("field, value, shown", BAD_FIELDS, ids=[f"{f}={s}" for f, _, s in BAD_FIELDS])
def test_bad_field_type_or_range_is_a_config_error(field, value, shown, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED["cogvideox-2b"] | {field: value}))
    with pytest.raises(ConfigError) as info:
        VAEConfig.from_json_file(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid CogVideoX VAE config: {field}: "), msg
    assert msg.endswith(f"got {shown}"), msg
    assert "\n" not in msg  # one problem, one line
    # built directly (replace), the same check runs
    with pytest.raises(ConfigError, match=re.escape(f"{field}: ")):
        PRESETS["cogvideox-2b"].replace(**{field: value})


def test_all_bad_fields_are_reported_together_one_per_line():
    cfg = PUBLISHED["cogvideox-2b"] | {
        "norm_num_groups": 0,
        "norm_eps": "x",
        "force_upcast": "no",
        "latents_mean": "abc",
        "block_out_channels": [128, 256],
        "mid_block_add_attention": True,
    }
    with pytest.raises(ConfigError) as info:
        VAEConfig.from_diffusers_config(cfg, source="vae/config.json")
    lines = str(info.value).splitlines()
    assert lines[0] == "vae/config.json: invalid CogVideoX VAE config, 7 problems:"
    assert lines[1:] == [
        "  - unknown config key 'mid_block_add_attention'",
        '  - norm_eps: must be a finite number >= 0, got "x"',
        "  - norm_num_groups: must be an integer >= 1, got 0",
        '  - latents_mean: must be null or a list of finite numbers, got "abc"',
        '  - force_upcast: must be true, false or a number, got "no"',
        "  - down_block_types: has 4 entries, but block_out_channels has 2 "
        "(one block type per entry of block_out_channels)",
        "  - up_block_types: has 4 entries, but block_out_channels has 2 "
        "(one block type per entry of block_out_channels)",
    ]  # (no divisibility line: norm_num_groups itself is already reported)
    assert len(info.value.problems) == 7


@pytest.mark.parametrize(
    "bad, needles",
    [
        ({"norm_num_groups": 0}, ["norm_num_groups: must be an integer >= 1, got 0"]),
        ({"block_out_channels": 8}, ["block_out_channels: must be a non-empty list of integers >= 1, got 8"]),
        ({"force_upcast": "no", "latents_mean": "abc", "temporal_compression_ratio": "4"},
         ['force_upcast: must be true, false or a number, got "no"', 'latents_mean: must be null or a list',
          'temporal_compression_ratio: must be a number that is a power of two (1, 2, 4, 8, ...), got "4"']),
        ({"in_channels": 10**30}, [f"in_channels: must be below 2**63 (sizes are 64-bit integers), got {10**30}"]),
    ],
    ids=["groups-zero", "channels-int", "three-fields", "beyond-int64"],
)
def test_convert_cli_bad_config_field_exits_3(bad, needles, tmp_path):
    from cogvae.converter.convert import default_source

    exe = script("cogvae-convert")
    src = tmp_path / "vae"
    shutil.copytree(default_source(), src)
    cfg = json.loads((src / "config.json").read_text()) | bad
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    out = tmp_path / "ckpt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    p = subprocess.run([exe, str(src), "--out", str(out), "-q"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith(f"Error: {src / 'config.json'}: invalid CogVideoX VAE config")
    for n in needles:
        assert sum(n in line for line in lines) == 1, (n, p.stderr)
    assert len(lines) == (1 if len(bad) == 1 else 1 + len(bad))  # one line per problem
    assert not out.exists()


def test_the_config_takes_the_activations_the_model_has():
    """Every act_fn the config accepts is one the resnets apply, and the other way round."""
    from cogvae.model import config
    from cogvae.model.layers import ACTIVATIONS

    assert set(config._ACTIVATIONS) == set(ACTIVATIONS)
