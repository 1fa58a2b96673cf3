"""Parity of the bundled NNX VAE with diffusers' AutoencoderKLCogVideoX, in fp32.

The reference is diffusers itself, built in-process with random weights (``torch.manual_seed``);
the NNX model gets those weights through the project's own mapping engine. Both paths of the NNX
model are checked: ``compiled=True`` (jit + scan over frame batches) and ``compiled=False`` (a
plain Python loop). Tolerances: relative L2 <= 1e-5 and max abs <= 1e-4 (see ``_ref``).

The default run checks every config, frame count and tiling mode in a covering design
(see ``cases``); ``-m slow`` runs the rest of the cross product, with the same tolerances.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from _ref import TINY, assert_parity, diffusers_vae, to_bthwc, to_nnx

ENCODE_FRAMES = [1, 5, 8, 9, 16, 17, 33]
DECODE_LATENTS = [1, 2, 3, 4, 5, 6]

# The default run covers every config and every frame count without running their whole cross
# product, which `-m slow` runs (the suite's budget is about 10 minutes on 2 cores, and each case
# compiles its own kernels):
# - every config runs the count that has an odd first batch and a carried cache (encode 17 = 9 + 8
#   frames, decode 5 = 3 + 2 latents) compiled (jit + scan, what users get), and two configs each
#   run it on the plain loop (compiled=False) too (LOOP_DEFAULT);
# - every other count runs compiled on at least one config, the counts spread over the configs
#   (single frame, a lone odd batch, even batches only, several scan steps);
# - slow: the rest of the cross product, and the plain loop at every count on EAGER_CONFIG (the
#   loop's op-by-op dispatch compiles each op for each new shape).
EAGER_CONFIG = "l2-g2-z6"
ENCODE_DEFAULT = {"l1-g4-z3-postquant": {1, 17, 33}, "l1-g4-z4": {5, 16, 17}, "l2-g2-z6": {9, 17},
                  "l3-g8-z3-quant": {8, 17, 33}}
DECODE_DEFAULT = {"l1-g4-z3-postquant": {1, 5, 6}, "l1-g4-z4": {2, 5}, "l2-g2-z6": {3, 5},
                  "l3-g8-z3-quant": {4, 5, 6}}
LOOP_DEFAULT = {"encode": {"l1-g4-z4", "l3-g8-z3-quant"}, "decode": {"l1-g4-z3-postquant", "l2-g2-z6"}}


def _slow_unless(default: bool):
    return () if default else pytest.mark.slow


def _case(name: str, count: int, compiled: bool, default: bool):
    """One (name, count, compiled) case, its id naming the path; marked slow unless ``default``."""
    return pytest.param(name, count, compiled, marks=_slow_unless(default),
                        id=f"{name}-{count}-{'compiled' if compiled else 'loop'}")


def cases(counts: list[int], default: dict[str, set[int]], multi_batch: int, loop: set[str]) -> list:
    """(name, count, compiled) for every config and count; those outside the default design are
    marked slow."""
    out = []
    for name in sorted(TINY):
        for count in counts:
            for compiled in (True, False) if name == EAGER_CONFIG or count == multi_batch else (True,):
                fast = count in default[name] and (compiled or (count == multi_batch and name in loop))
                out.append(_case(name, count, compiled, fast))
    return out


def test_the_default_run_covers_every_config_and_count():
    for counts, default in ((ENCODE_FRAMES, ENCODE_DEFAULT), (DECODE_LATENTS, DECODE_DEFAULT)):
        assert set(default) == set(TINY)
        assert set().union(*default.values()) == set(counts)
    assert all(names <= set(TINY) for names in LOOP_DEFAULT.values())
    assert LOOP_DEFAULT["encode"] | LOOP_DEFAULT["decode"] == set(TINY)


@functools.lru_cache(maxsize=None)
def pair(name: str):
    ref = diffusers_vae(seed=sorted(TINY).index(name), **TINY[name])
    return ref, to_nnx(ref)


def spatial(name: str) -> int:
    return 2 ** (len(TINY[name]["block_out_channels"]) - 1)


@pytest.mark.parametrize("name,frames,compiled", cases(ENCODE_FRAMES, ENCODE_DEFAULT, 17, LOOP_DEFAULT["encode"]))
def test_encode_matches_diffusers(name, frames, compiled):
    ref, ours = pair(name)
    torch.manual_seed(frames)
    x = torch.randn(1, 3, frames, 16, 24)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(to_bthwc(x), compiled=compiled)
    assert_parity(mean, dist.mean, f"{name} encode T={frames} mean compiled={compiled}")
    assert_parity(logvar, dist.logvar, f"{name} encode T={frames} logvar compiled={compiled}")


@pytest.mark.parametrize("name,latents,compiled", cases(DECODE_LATENTS, DECODE_DEFAULT, 5, LOOP_DEFAULT["decode"]))
def test_decode_matches_diffusers(name, latents, compiled):
    ref, ours = pair(name)
    torch.manual_seed(100 + latents)
    zc = TINY[name]["latent_channels"]
    z = torch.randn(2, zc, latents, 4, 6)  # batch of 2: samples must stay independent
    with torch.no_grad():
        video = ref.decode(z).sample
    assert_parity(ours.decode(to_bthwc(z), compiled=compiled), video, f"{name} decode t={latents} compiled={compiled}")


def test_decode_frame_counts_follow_diffusers():
    """13 latents give 49 frames (not 52, as a frame-by-frame decode would); 1 gives 1."""
    import jax

    ref, ours = pair("l2-g2-z6")
    # Shapes only: trace the reference loop abstractly (jax.eval_shape), nothing is computed.
    for latents, frames in [(1, 1), (2, 8), (3, 9), (4, 16), (5, 17), (13, 49)]:
        z = jax.ShapeDtypeStruct((1, latents, 2, 2, 6), jnp.float32)
        assert jax.eval_shape(lambda z: ours.decode(z, compiled=False), z).shape[1] == frames
    for frames, latents in [(1, 1), (5, 2), (8, 2), (9, 3), (16, 4), (17, 5), (49, 13)]:
        x = jax.ShapeDtypeStruct((1, frames, 8, 8, 3), jnp.float32)
        assert jax.eval_shape(lambda x: ours.encode(x, compiled=False)[0], x).shape[1] == latents


# Default run: a config with a post-quant conv and one with both quant convs; the others under -m slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=_slow_unless(n in ("l1-g4-z3-postquant", "l3-g8-z3-quant")))
                                  for n in sorted(TINY)])
def test_full_call_matches_diffusers(name):
    ref, ours = pair(name)
    torch.manual_seed(7)
    x = torch.randn(1, 3, 9, 16, 24)
    with torch.no_grad():
        out = ref(x).sample
    assert_parity(ours(to_bthwc(x)), out, f"{name} __call__ T=9")


def test_sample_posterior_uses_mean_and_std():
    _, ours = pair("l1-g4-z4")
    import jax

    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 16, 16, 3)), jnp.float32)
    mean, logvar = ours.encode(x)
    key = jax.random.key(3)
    expected = ours.decode(mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype))
    np.testing.assert_array_equal(np.asarray(ours(x, sample_posterior=True, rng=key)), np.asarray(expected))
    with pytest.raises(ValueError, match="sample_posterior=True needs rng"):
        ours(x, sample_posterior=True)


TILE = dict(tile_sample_min_height=16, tile_sample_min_width=24, tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 3)


# Each config and each frame count once in the default run; the loop path at 9 frames on one
# config (the rest under -m slow).
@pytest.mark.parametrize("name,frames,compiled", [
    _case(n, f, c, (n, f, c) in {("l1-g4-z4", 9, True), ("l3-g8-z3-quant", 1, True), ("l1-g4-z4", 9, False)})
    for n in ("l1-g4-z4", "l3-g8-z3-quant") for f in (1, 9) for c in ((True, False) if f == 9 else (True,))])
def test_tiled_encode_matches_diffusers(name, frames, compiled):
    """Tiles small enough to force several tiles in both directions, edge tiles included."""
    ref, ours = pair(name)
    ref.enable_tiling(**TILE)
    ours.enable_tiling(**TILE)
    try:
        torch.manual_seed(11)
        x = torch.randn(1, 3, frames, 40, 60)
        with torch.no_grad():
            dist = ref.encode(x).latent_dist
        # The plain loop (compiled=False) runs the same tiles through the same masked layers.
        mean, logvar = ours.encode(to_bthwc(x), compiled=compiled)
        assert_parity(mean, dist.mean, f"{name} tiled encode T={frames} compiled={compiled}")
        assert_parity(logvar, dist.logvar, f"{name} tiled encode logvar T={frames} compiled={compiled}")
    finally:
        ref.disable_tiling()
        ours.disable_tiling()


# Each config and each latent count once in the default run (the loop path's tiles: tiled encode);
# the rest, the loop at 4 latents (first batch and a carried cache) among them, under -m slow.
@pytest.mark.parametrize("name,latents,compiled", [
    _case(n, t, c, (n, t, c) in {("l1-g4-z4", 1, True), ("l3-g8-z3-quant", 3, True), ("l1-g4-z4", 4, True)})
    for n in ("l1-g4-z4", "l3-g8-z3-quant") for t in (1, 3, 4) for c in ((True, False) if t == 4 else (True,))])
def test_tiled_decode_matches_diffusers(name, latents, compiled):
    ref, ours = pair(name)
    ref.enable_tiling(**TILE)
    ours.enable_tiling(**TILE)
    try:
        s = spatial(name)
        torch.manual_seed(12)
        z = torch.randn(1, TINY[name]["latent_channels"], latents, 40 // s, 60 // s)
        with torch.no_grad():
            video = ref.decode(z).sample
        assert_parity(ours.decode(to_bthwc(z), compiled=compiled), video, f"{name} tiled decode t={latents} compiled={compiled}")
    finally:
        ref.disable_tiling()
        ours.disable_tiling()


@pytest.mark.parametrize("case", ["untiled", "tiled", "tiled-exact"])
def test_a_video_too_small_to_encode_is_refused_as_diffusers_refuses_it(case):
    """diffusers' Downsample3D (pad to n + 1, 3x3 conv of stride 2) cannot run on fewer than 2
    pixels: torch raises. This model must raise too, not return an empty latent. l1-g4-z4 halves
    twice, so 3 rows fail; with 16-row tiles every 12 rows over 27 rows the last tile is 3 rows high."""
    ref, ours = pair("l1-g4-z4")
    x = torch.randn(1, 3, 1, 3 if case == "untiled" else 27, 16)
    if case != "untiled":
        ref.enable_tiling(**TILE)
        ours.enable_tiling(**TILE, pad_tiles=case == "tiled")
    try:
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"), torch.no_grad():
            ref.encode(x)
        with pytest.raises(ValueError, match="height 3 is too small for the encoder: each of its 2 downsamplings "
                                             "needs at least 2 pixels .* the smallest height is 4"):
            ours.encode(to_bthwc(x))
    finally:
        ref.disable_tiling()
        ours.disable_tiling()


def test_blocks_without_resnets_match_diffusers():
    """layers_per_block=0, which diffusers builds and runs (its config check allows it)."""
    ref = diffusers_vae(seed=7, block_out_channels=(8, 8, 8), layers_per_block=0, norm_num_groups=4, latent_channels=4)
    ours = to_nnx(ref)
    torch.manual_seed(13)
    x, z = torch.randn(1, 3, 17, 16, 16), torch.randn(1, 4, 5, 4, 4)
    with torch.no_grad():
        mean, video = ref.encode(x).latent_dist.mean, ref.decode(z).sample
    assert_parity(ours.encode(to_bthwc(x))[0], mean, "layers_per_block=0 encode T=17")
    assert_parity(ours.decode(to_bthwc(z)), video, "layers_per_block=0 decode t=5")


def test_blocks_without_resnets_and_unequal_channels_decode_but_cannot_encode():
    """layers_per_block=0 with block_out_channels not all equal: diffusers builds the model and
    decodes with it (a decoder block has one resnet more), but its encode fails in a GroupNorm,
    nothing having changed conv_in's channels. Decode matches; every way to encode is refused
    with one clear error before any work (it was a broadcasting TypeError from deep in jax)."""
    ref = diffusers_vae(seed=7, block_out_channels=(8, 16), layers_per_block=0, norm_num_groups=4, latent_channels=4)
    ours = to_nnx(ref)
    torch.manual_seed(13)
    x, z = torch.randn(1, 3, 9, 16, 16), torch.randn(1, 4, 3, 8, 8)
    with torch.no_grad():
        video = ref.decode(z).sample
        with pytest.raises(RuntimeError):
            ref.encode(x)
    assert_parity(ours.decode(to_bthwc(z)), video, "layers_per_block=0, channels (8, 16): decode t=3")
    why = r"this VAE cannot encode: with layers_per_block=0 .* block_out_channels are all equal \(they are \[8, 16\]\)"
    for call in (ours.encode, ours.encode_moments, ours.tiled_encode, ours):
        with pytest.raises(ValueError, match=why):
            call(to_bthwc(x))


# Default run: gelu (torch's exact erf form); mish, relu, swish (every other test's SiLU) and the
# upper-case spelling under -m slow.
@pytest.mark.parametrize("act_fn", ["gelu", *(pytest.param(a, marks=pytest.mark.slow) for a in ("mish", "relu", "swish", "GELU"))])
def test_every_activation_diffusers_builds_matches(act_fn):
    """A config's act_fn is any name of diffusers' get_activation, in any case (it lowercases the
    name); the resnets use it, the conv_act before each conv_out stays SiLU (hard-coded in
    diffusers). GELU is torch's exact (erf) form, not jax's default tanh approximation. Encode
    over two frame batches, decode over an odd first and a second latent batch."""
    ref = diffusers_vae(seed=11, block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, act_fn=act_fn)
    ours = to_nnx(ref)
    assert ours.config.act_fn == act_fn
    torch.manual_seed(17)
    x, z = torch.randn(1, 3, 17, 16, 16), torch.randn(1, 4, 5, 4, 4)
    with torch.no_grad():
        mean, video = ref.encode(x).latent_dist.mean, ref.decode(z).sample
    assert_parity(ours.encode(to_bthwc(x))[0], mean, f"act_fn={act_fn} encode T=17")
    assert_parity(ours.decode(to_bthwc(z)), video, f"act_fn={act_fn} decode t=5")


def test_slicing_matches_diffusers():
    ref, ours = pair("l1-g4-z4")
    ref.enable_slicing()
    ours.enable_slicing()
    try:
        torch.manual_seed(5)
        x = torch.randn(3, 3, 9, 16, 16)
        z = torch.randn(3, 4, 3, 4, 4)
        with torch.no_grad():
            mean = ref.encode(x).latent_dist.mean
            video = ref.decode(z).sample
        assert_parity(ours.encode(to_bthwc(x))[0], mean, "slicing encode B=3")
        assert_parity(ours.decode(to_bthwc(z)), video, "slicing decode B=3")
    finally:
        ref.disable_slicing()
        ours.disable_slicing()


@functools.lru_cache(maxsize=None)
def full_pair():
    # The default config is the real CogVideoX-2b architecture (436 tensors, 215.6 M parameters).
    ref = diffusers_vae(seed=0)
    return ref, to_nnx(ref)


def test_full_size_architecture():
    ref, ours = full_pair()
    assert len(ref.state_dict()) == 436
    assert sum(p.numel() for p in ref.parameters()) == 215_583_907


# Full size, default run: encode of 1 frame and decode of 4 latents (a first batch and a carried
# cache); 9 frames, 1 and 3 latents and the full __call__ (encode 9 frames, decode 3 latents) run
# under -m slow.
@pytest.mark.parametrize("frames", [1, pytest.param(9, marks=pytest.mark.slow)])
def test_full_size_encode_matches_diffusers(frames):
    ref, ours = full_pair()
    torch.manual_seed(21)
    x = torch.randn(1, 3, frames, 16, 24)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(to_bthwc(x))
    assert_parity(mean, dist.mean, f"full-size encode T={frames} mean")
    assert_parity(logvar, dist.logvar, f"full-size encode T={frames} logvar")


@pytest.mark.parametrize("latents", [pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), 4])
def test_full_size_decode_matches_diffusers(latents):
    ref, ours = full_pair()
    torch.manual_seed(22)
    z = torch.randn(1, 16, latents, 2, 3)
    with torch.no_grad():
        video = ref.decode(z).sample
    assert_parity(ours.decode(to_bthwc(z)), video, f"full-size decode t={latents}")


@pytest.mark.slow
def test_full_size_call_matches_diffusers():
    ref, ours = full_pair()
    torch.manual_seed(23)
    x = torch.randn(1, 3, 9, 16, 16)
    with torch.no_grad():
        out = ref(x).sample
    assert_parity(ours(to_bthwc(x)), out, "full-size __call__ T=9")
