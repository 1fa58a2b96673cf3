"""VAEConfig: built from diffusers configs with an allowlist; anything else is a clear error."""

import re

import pytest

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


def test_other_model_class_is_an_error():
    cfg = {"_class_name": "AutoencoderKL", "in_channels": 3}
    with pytest.raises(ConfigError, match="'AutoencoderKL', not 'AutoencoderKLCogVideoX': not a CogVideoX VAE"):
        VAEConfig.from_diffusers_config(cfg)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(latent_channels=16, use_quant_conv=True), "need latent_channels == out_channels"),
        (dict(latent_channels=16, use_post_quant_conv=True), "need latent_channels == out_channels"),
        (dict(act_fn="gelu"), "unsupported activation 'gelu'"),
        (dict(norm_num_groups=5), "not divisible by norm_num_groups=5"),
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
