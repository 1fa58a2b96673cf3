"""The compiled path (jit + lax.scan over frame batches) against the plain reference loop.

Also: tracing does not grow with the number of frame batches, compiled functions are reused
across calls and tiles, and the bf16 compute policy stays close to fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _ref import assert_parity, diffusers_vae, state_arrays, to_bthwc
from cogvae.converter.loading import model_from_tensors
from cogvae.model import VAEConfig
from cogvae.model.layers import CausalConv3d
from cogvae.model import vae as vae_mod

CONFIG = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)


@functools.lru_cache(maxsize=None)
def models():
    ref = diffusers_vae(seed=3, **CONFIG)
    cfg = VAEConfig.from_diffusers_config(dict(ref.config))
    arrays = state_arrays(ref)
    fp32 = model_from_tensors(cfg, arrays, compute_dtype=jnp.float32)
    bf16 = model_from_tensors(cfg, arrays, dtype="bfloat16", compute_dtype=jnp.bfloat16)
    return fp32, bf16


def rel_l2(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Default run: 7 latents (an odd first batch, then a scan of two); -m slow adds 1, 2, 3, 6.
@pytest.mark.parametrize("latents", [7, *(pytest.param(n, marks=pytest.mark.slow) for n in (1, 2, 3, 6))])
def test_compiled_decode_equals_reference_loop(latents):
    vae, _ = models()
    z = jnp.asarray(np.random.default_rng(latents).standard_normal((1, latents, 4, 6, 4)), jnp.float32)
    fast = np.asarray(vae.decode(z, compiled=True))
    slow = np.asarray(vae.decode(z, compiled=False))
    assert fast.shape == slow.shape
    assert rel_l2(fast, slow) <= 1e-6 and np.abs(fast - slow).max() <= 1e-5


# Default run: 25 frames (an odd first batch, then a scan of two); -m slow adds 1, 9, 17.
@pytest.mark.parametrize("frames", [25, *(pytest.param(n, marks=pytest.mark.slow) for n in (1, 9, 17))])
def test_compiled_encode_equals_reference_loop(frames):
    vae, _ = models()
    x = jnp.asarray(np.random.default_rng(frames).uniform(-1, 1, (1, frames, 16, 24, 3)), jnp.float32)
    fast = np.asarray(vae.encode(x, compiled=True)[0])
    slow = np.asarray(vae.encode(x, compiled=False)[0])
    assert rel_l2(fast, slow) <= 1e-6 and np.abs(fast - slow).max() <= 1e-5


def _traces(fn):
    before = dict(vae_mod.TRACE_COUNTS)
    fn()
    return {k: vae_mod.TRACE_COUNTS[k] - before[k] for k in before}


def test_trace_count_does_not_grow_with_decode_batches():
    """2 and 6 decode batches trace the decoder the same number of times (scan, not unrolling)."""
    vae, _ = models()
    z2 = jnp.zeros((1, 4, 3, 5, 4))  # 4 latents: 2 batches
    z6 = jnp.zeros((1, 12, 3, 5, 4))  # 12 latents: 6 batches
    t2 = _traces(lambda: vae.decode(z2).block_until_ready())
    t6 = _traces(lambda: vae.decode(z6).block_until_ready())
    # The decoder is traced once for the first batch and once for the scan body, however many
    # batches follow; the 6-batch call even reuses the first-batch function (same batch shape).
    assert (t2["decode_first"], t2["decode_scan"]) == (1, 1)
    assert (t6["decode_first"], t6["decode_scan"]) == (0, 1)
    # Same shapes again: the compiled functions are reused, nothing is traced.
    again = _traces(lambda: (vae.decode(z2).block_until_ready(), vae.decode(z6).block_until_ready()))
    assert sum(again.values()) == 0


def test_trace_count_does_not_grow_with_encode_batches():
    vae, _ = models()
    x2 = jnp.zeros((1, 17, 8, 12, 3))  # 2 batches (9 + 8)
    x5 = jnp.zeros((1, 41, 8, 12, 3))  # 5 batches
    t2 = _traces(lambda: vae.encode(x2)[0].block_until_ready())
    t5 = _traces(lambda: vae.encode(x5)[0].block_until_ready())
    assert (t2["encode_first"], t2["encode_scan"]) == (1, 1)
    assert (t5["encode_first"], t5["encode_scan"]) == (0, 1)


def test_settings_the_kernels_do_not_read_compile_nothing_again():
    """Slicing, tiling (on, off, other tile sizes) and frame-batch settings are Python attributes of
    the VAE; the kernels were keyed on the whole VAE's graphdef, which holds them, so toggling
    ``enable_slicing()`` (a batch of one never slices) or tiling on and off compiled the same
    untiled kernels again. They are now keyed on what they read (the encoder or decoder, the
    quant convs, gradient checkpointing): nothing is traced again. Checkpointing, which changes
    what is computed, still gets its own kernels."""
    vae, _ = models()
    z = jnp.zeros((1, 4, 3, 5, 4))
    x = jnp.zeros((1, 17, 8, 12, 3))
    run = lambda: (vae.decode(z).block_until_ready(), vae.encode(x)[0].block_until_ready())  # noqa: E731
    want = run()
    _traces(run)

    def toggles():
        vae.enable_slicing()
        vae.enable_tiling(tile_sample_min_height=96, tile_sample_min_width=96, pad_tiles=False)
        vae.num_latent_frames_batch_size = 2  # the default, set again
        try:
            return run()  # tiling on, but these inputs are below the tile size: untiled kernels
        finally:
            vae.disable_tiling()
            vae.disable_slicing()
            vae.tiling = saved  # models() is shared: the next test gets the default tiles back

    saved = vae.tiling
    assert sum(_traces(toggles).values()) == 0
    try:
        vae.enable_gradient_checkpointing()
        assert _traces(run) == {"encode_first": 1, "encode_scan": 1, "decode_first": 1, "decode_scan": 1}
    finally:
        vae.disable_gradient_checkpointing()
    for a, b in zip(run(), want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Default run: the strict dtype mode (it also catches the bf16-by-fp32 tile blend); rank promotion under -m slow.
@pytest.mark.parametrize("mode", ["dtype-promotion-strict", pytest.param("rank-promotion-raise", marks=pytest.mark.slow)])
def test_runs_under_jaxs_strict_numpy_modes(mode):
    """Some codebases set ``jax_numpy_rank_promotion="raise"`` or
    ``jax_numpy_dtype_promotion="strict"`` globally. Every (C,) bias and GroupNorm parameter was
    added to (B, T, H, W, C) by rank promotion (every encode and decode raised: checked on one
    frame batch of each), and the tile blend multiplied bf16 tiles by fp32 weights (a tiled bf16
    decode raised). The same values result."""
    fp32, bf16 = models()
    if mode.startswith("rank"):
        z, x = jnp.ones((1, 3, 3, 5, 4)), jnp.ones((1, 9, 8, 12, 3)) * 0.5
        strict = jax.numpy_rank_promotion("raise")

        def run():
            return fp32.decode(z), fp32.encode(x)[0]
    else:
        z = jnp.ones((1, 1, 3, 5, 4), jnp.bfloat16)
        strict = jax.numpy_dtype_promotion("strict")

        def run():
            bf16.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
            try:
                return (bf16.decode(z),)
            finally:
                bf16.disable_tiling()
    want = run()
    with strict:
        got = run()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiles_share_one_compiled_function():
    """Interior and edge tiles (four different sizes here) run through one trace per kernel."""
    vae, _ = models()
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=24)
    try:
        z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 11, 17, 4)), jnp.float32)
        t = _traces(lambda: vae.decode(z).block_until_ready())
        assert t["decode_first"] == 1 and t["decode_scan"] == 1
        x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 17, 44, 68, 3)), jnp.float32)
        t = _traces(lambda: vae.encode(x)[0].block_until_ready())
        assert t["encode_first"] == 1 and t["encode_scan"] == 1
    finally:
        vae.disable_tiling()


def test_scan_gets_region_based_copy_insertion():
    """The scan's XLA option is known to this jaxlib (it is dropped, not fatal, where it is not)."""
    import jax

    backend = jax.default_backend()
    expected = {"cpu": "xla_cpu_copy_insertion_use_region_analysis"}.get(backend, "xla_gpu_copy_insertion_use_region_analysis")
    assert vae_mod.compiler_options(backend)[expected] is True
    assert vae_mod.compiler_options("tpu") == {}


@pytest.mark.parametrize("kernel", ["first", "scan"])
def test_gpu_kernels_compile_without_the_latency_hiding_scheduler(kernel):
    """On a GPU both kernels turn XLA's latency-hiding scheduler off (its reordering kept several
    layers' activations alive: bench/RESULTS.md, deviceless H200 compile); the option is a field of
    XLA's DebugOptions, which every jaxlib backend parses, so it is checked on this one."""
    assert vae_mod.kernel_compiler_options("gpu", kernel)["xla_gpu_enable_latency_hiding_scheduler"] is False
    assert "xla_gpu_enable_latency_hiding_scheduler" not in vae_mod.kernel_compiler_options("cpu", kernel)
    assert vae_mod.kernel_compiler_options("tpu", kernel) == {}


def test_unknown_kernel_options_are_dropped_not_fatal(monkeypatch):
    opts = {"cpu": {"first": {"xla_no_such_option_anywhere": True}, "scan": {}}}
    monkeypatch.setattr(vae_mod, "KERNEL_COMPILER_OPTIONS", opts)
    assert vae_mod.kernel_compiler_options("cpu", "first") == {}
    assert vae_mod.kernel_compiler_options("cpu", "first", check=False) == {"xla_no_such_option_anywhere": True}


def _unpadded_pair():
    # A config of its own (other GroupNorm groups): an unpadded tile runs the untiled kernels, and
    # another test's model could have compiled them for one of these shapes already.
    ref = diffusers_vae(seed=3, **dict(CONFIG, norm_num_groups=2))
    vae = model_from_tensors(VAEConfig.from_diffusers_config(dict(ref.config)), state_arrays(ref),
                             compute_dtype=jnp.float32)
    ref.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=24)
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=24, pad_tiles=False)
    return ref, vae


def test_unpadded_tiles_compile_once_per_tile_shape():
    """pad_tiles=False: each distinct tile shape is traced once per kernel, however many tiles
    have it, and the result is diffusers' tiled decode (the padded path's parity is in
    test_parity.py)."""
    ref, vae = _unpadded_pair()
    z = torch.randn(1, 4, 4, 10, 15, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.decode(z).sample
    t = _traces(lambda: vae.decode(to_bthwc(z)).block_until_ready())
    # diffusers' loop: 4 x 6 latent tiles (16 x 24 pixels, 4x compression) every 3 rows and
    # 4 columns (overlaps 1/6, 1/5) over 10 x 15 latents: 4 x 4 tiles, heights {4, 1} x
    # widths {6, 3}.
    shapes = {(min(4, 10 - i), min(6, 15 - j)) for i in range(0, 10, 3) for j in range(0, 15, 4)}
    assert len(shapes) == 4
    assert t["decode_first"] == len(shapes) and t["decode_scan"] == len(shapes)
    out = vae.decode(to_bthwc(z))
    assert _traces(lambda: vae.decode(to_bthwc(z)).block_until_ready()) == dict.fromkeys(t, 0)
    assert_parity(out, expected, "unpadded tiles decode")


@pytest.mark.slow  # about 40 s; the default run checks unpadded tiles on decode
def test_unpadded_tiles_encode_as_diffusers():
    ref, vae = _unpadded_pair()
    # 36 x 56 pixels: tiles 16 x 24 every 13 x 19, edge tiles 10 x 18 (diffusers itself fails on
    # an edge tile too thin for its convs, e.g. 60 columns would leave a 3-pixel one).
    x = torch.rand(1, 3, 9, 36, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected_mean = ref.encode(x).latent_dist.mean
    assert_parity(vae.encode(to_bthwc(x))[0], expected_mean, "unpadded tiles encode")


@pytest.mark.parametrize("batch_tiles", [True, False])
def test_equal_small_tiles_run_stacked_within_one_full_tile(batch_tiles):
    """pad_tiles=False at 2b scale (60x90 latents, 30x45 tiles every 25 rows and 36 columns): the
    4 full tiles run alone, and with batch_tiles the two 30x18 and the two 10x45 edge tiles each
    run as one call of batch 2 (two fit in one full tile's pixels), the 10x18 one alone. A
    stand-in tile function records the calls; the blended result must not depend on the stacking."""
    vae, _ = models()
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 60, 90, 4)), jnp.float32)
    calls = []

    def run_tile(tile, valid):  # an 8x nearest upsampling, so each output pixel names its tile's input
        assert valid is None
        calls.append(tuple(tile.shape[:1] + tile.shape[2:4]))
        return jnp.repeat(jnp.repeat(tile[..., :3] * 2 + 1, 8, axis=2), 8, axis=3)

    def tiled(stack):
        vae.tiling = vae_mod.TilingConfig(240, 360, spatial_compression=8, pad_tiles=False, batch_tiles=stack)
        return vae._tiled(z, (30, 45), (240, 360), (1 / 6, 1 / 5), run_tile, lambda n: n * 8)

    saved = vae.tiling
    try:
        plain = tiled(False)
        calls.clear()
        out = tiled(batch_tiles)
    finally:
        vae.tiling = saved
    stacked = [(2, 30, 18), (2, 10, 45)] if batch_tiles else [(1, 30, 18)] * 2 + [(1, 10, 45)] * 2
    assert sorted(calls) == sorted([(1, 30, 45)] * 4 + stacked + [(1, 10, 18)])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    assert out.shape == (1, 2, 480, 720, 3)


# Slow (about 2 minutes): the stand-in test above checks the stacking and splitting in the default run.
@pytest.mark.slow
def test_stacked_tiles_give_each_tile_its_own_result():
    """The real kernels on stacked tiles (batch_tiles) give what each tile gives alone, values and
    gradients. Encode: 16x24-pixel tiles every 13 rows and 19 columns over 30x50 pixels leave two
    16x12 and two 4x24 edge tiles; with a batch of 2 videos each pair runs as one batch of 4.
    Gradient of a decode: 4x6 latent tiles every 3 rows and 4 columns over 10x15 latents leave
    three 1x6 tiles, run as one batch of 3. (Stacked decode values against diffusers, over a
    carried cache: test_unpadded_tiles_compile_once_per_tile_shape.) One frame and one latent
    each: the first-batch kernel alone, to keep the compiles few."""
    vae, _ = models()
    z = jnp.asarray(np.random.default_rng(5).standard_normal((1, 1, 10, 15, 4)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (2, 1, 30, 50, 3)), jnp.float32)
    saved = vae.tiling
    out, grads = {}, {}
    try:
        for stack in (True, False):
            vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=24, pad_tiles=False, batch_tiles=stack)
            out[stack] = np.asarray(vae.encode(x)[0])
            grads[stack] = np.asarray(jax.grad(lambda v: jnp.sum(vae.decode(v)[:, :, ::3, ::5] ** 2))(z))
    finally:
        vae.disable_tiling()
        vae.tiling = saved
    a, b = out[True], out[False]
    assert a.shape == b.shape and a.shape[0] == 2
    assert rel_l2(a, b) <= 1e-6 and np.abs(a - b).max() <= 1e-5
    # the gradient of a sum of squares reaches hundreds: the same bounds, relative to its largest value
    a, b = grads[True], grads[False]
    assert a.shape == b.shape == z.shape
    assert rel_l2(a, b) <= 1e-6 and np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


# bf16 compute against fp32 on the same weights: bf16 keeps 8 mantissa bits, so after ~20 convs
# the decode differs at the percent level. Stated tolerance: relative L2 <= 2e-2, all finite.
BF16_REL_L2 = 2e-2


# Default run: 4 latents (a first batch and a carried cache); -m slow adds 1 and 3.
@pytest.mark.parametrize("latents", [4, *(pytest.param(n, marks=pytest.mark.slow) for n in (1, 3))])
def test_bf16_decode_close_to_fp32(latents):
    fp32, bf16 = models()
    z = np.random.default_rng(10 + latents).standard_normal((1, latents, 4, 6, 4)).astype(np.float32)
    ref = np.asarray(fp32.decode(jnp.asarray(z)))
    out = bf16.decode(jnp.asarray(z, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    assert rel_l2(out, ref) <= BF16_REL_L2


def test_bf16_parameters_and_fp32_statistics():
    _, bf16 = models()
    from flax import nnx

    leaves = [v[...] for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param))]
    assert {a.dtype for a in leaves} == {jnp.dtype(jnp.bfloat16)}
    # GroupNorm statistics in fp32: a large offset that bf16 statistics would wipe out.
    norm = bf16.encoder.norm_out
    x = (jnp.ones((1, 2, 4, 4, norm.scale[...].shape[0]), jnp.float32) * 300.0
         + jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 4, norm.scale[...].shape[0])), jnp.float32))
    xb = x.astype(jnp.bfloat16)
    y32 = np.asarray(norm(xb).astype(jnp.float32))
    assert np.isfinite(y32).all() and np.abs(y32).max() < 10
    # ... and equal to torch's GroupNorm in float64 on the same bf16 input, up to the output's bf16
    # rounding (2**-8 relative): bf16 statistics of these values are wrong by O(1), not O(1e-3).
    g = norm.num_groups
    xf = np.asarray(xb, np.float64).reshape(*xb.shape[:4], g, -1)
    ref = (xf - xf.mean(axis=(1, 2, 3, 5), keepdims=True)) / np.sqrt(xf.var(axis=(1, 2, 3, 5), keepdims=True) + norm.eps)
    ref = ref.reshape(xb.shape) * np.asarray(norm.scale[...], np.float64) + np.asarray(norm.bias[...], np.float64)
    assert rel_l2(y32, ref) <= 2 ** -8, rel_l2(y32, ref)


def test_conv_lowering_switch_gets_its_own_compiled_functions(monkeypatch):
    """Changing COGVAE_CONV_IMPL must not reuse functions compiled for another lowering."""
    vae, _ = models()
    # A shape no other test decodes, so each lowering starts with nothing compiled.
    z = jnp.asarray(np.random.default_rng(5).standard_normal((1, 2, 5, 7, 4)), jnp.float32)
    outs = {}
    for impl in ("3d", "2d_sum", "2d_concat", "2d_concat_chunked"):
        monkeypatch.setenv("COGVAE_CONV_IMPL", impl)
        t = _traces(lambda: outs.__setitem__(impl, np.asarray(vae.decode(z))))
        assert t["decode_first"] == 1, impl
    for impl, out in outs.items():
        assert rel_l2(out, outs["3d"]) <= 1e-6, impl
    # Each lowering really ran its own code: different summation orders round differently.
    assert any(not np.array_equal(out, outs["3d"]) for impl, out in outs.items() if impl != "3d")


# Default run: the GPU's lowering (2d_concat_chunked); the TPU's (3d) under -m slow.
@pytest.mark.parametrize(
    "impl, reads", [("2d_concat_chunked", ("slice", "chunks")),
                    pytest.param("3d", ("conv", "slice", "barrier"), marks=pytest.mark.slow)]
)
def test_when_new_caches_are_read_changes_no_value(monkeypatch, impl, reads):
    """layers.TAIL_READ only orders XLA's buffers: on the reference loop every choice decodes the
    same bytes (5 latents: a first batch, and a second that reads and writes caches), with chunks of
    one frame so that two stacked chunks hold the previous cache. A changed entry is part of the
    compiled kernels' key: decode traces anew instead of reusing a function traced for another
    choice."""
    from cogvae.model import layers

    vae, _ = models()
    z = jnp.asarray(np.random.default_rng(11).standard_normal((1, 5, 4, 6, 4)), jnp.float32)
    monkeypatch.setattr(layers, "CHUNK_BYTES", 1)
    assert layers.TAIL_READ[impl] == reads[0]
    outs = {}
    with vae_mod.conv_impl_scope(impl):
        for read in reads:
            monkeypatch.setitem(layers.TAIL_READ, impl, read)
            outs[read] = np.asarray(vae.decode(z, compiled=False))  # the layer code, op by op
            if read != reads[0]:  # the other choices than the default, whose kernels other tests made
                t = _traces(lambda: outs.__setitem__(("compiled", read), np.asarray(vae.decode(z))))
                assert (t["decode_first"], t["decode_scan"]) == (1, 1), read
    for read, out in outs.items():
        if isinstance(read, str):  # the layer code gives the same bytes for every choice
            np.testing.assert_array_equal(out, outs[reads[0]], err_msg=read)
        else:  # compiled: XLA's fusions round differently from op-by-op, as in the tests above
            assert rel_l2(out, outs[reads[0]]) <= 1e-6 and np.abs(out - outs[reads[0]]).max() <= 1e-5, read
    monkeypatch.setitem(layers.TAIL_READ, "3d", "chunks")
    with pytest.raises(ValueError, match="chunks"):
        layers.conv3d(jnp.zeros((1, 4, 3, 3, 2)), jnp.zeros((3, 3, 3, 2, 2)), ((0, 0), (1, 1), (1, 1)),
                      None, "3d", tail=2)


def test_tpu_reads_new_caches_through_a_barrier(monkeypatch):
    """On a TPU the 3d lowering passes each new cache and its conv's output through one optimization
    barrier, in the first batch as well as the scan (the TPU compiler otherwise keeps every conv
    input of the batch alive until a late slice: bench/RESULTS.md, deviceless TPU compile); other
    backends, and inputs split over devices, keep their reads."""
    from cogvae.model import layers

    monkeypatch.delenv("COGVAE_CONV_IMPL", raising=False)
    assert layers.lowering(backend="tpu") == ("3d", "barrier")
    assert layers.lowering(backend="tpu", partitioned=True) == ("3d", "slice")
    assert layers.lowering(backend="gpu") == ("2d_concat_chunked", "slice")
    assert layers.lowering(backend="cpu") == ("2d_sum", "conv")
    assert layers.lowering("3d", backend="gpu") == ("3d", "conv")
    vae, _ = models()
    graphdef, state = nnx.split(vae)
    z = jnp.zeros((1, 3, 4, 6, 4), jnp.float32)
    first = vae_mod.kernels()["first"]
    barriers = {read: first.lower("decode", ("3d", read), graphdef, state, z, None).as_text().count("optimization_barrier")
                for read in ("barrier", "conv")}
    n_causal = sum(1 for _, m in nnx.iter_modules(vae.decoder) if isinstance(m, CausalConv3d)
                   and m.time_kernel_size > 1)
    assert barriers == {"barrier": n_causal, "conv": 0}


@pytest.mark.parametrize("latents", [3, pytest.param(1, marks=pytest.mark.slow)])  # 1 latent under -m slow
def test_ahead_of_time_first_batch_equals_decode(latents):
    """compile_decode_first_batch (compiled from shapes alone, before any weight exists) is the
    kernel decode runs for up to 3 latents: the same bytes, whatever the lowering."""
    from flax import nnx

    from cogvae.model import abstract_model

    vae, _ = models()
    graphdef, abstract_state = nnx.split(abstract_model(vae.config, dtype=jnp.float32))
    z = jnp.asarray(np.random.default_rng(latents).standard_normal((1, latents, 4, 6, 4)), jnp.float32)
    for impl in ("3d", "2d_sum"):
        run = vae_mod.compile_decode_first_batch(graphdef, abstract_state, z.shape, impl=impl)
        with vae_mod.conv_impl_scope(impl):
            want = np.asarray(vae.decode(z))
        np.testing.assert_array_equal(np.asarray(run(nnx.split(vae)[1], z)), want)
    with pytest.raises(ValueError, match="at most 3 latent frames"):
        vae_mod.compile_decode_first_batch(graphdef, abstract_state, (1, 4, 4, 6, 4))


@pytest.mark.parametrize("config", [CONFIG, dict(CONFIG, latent_channels=3, use_quant_conv=True, use_post_quant_conv=True)])
def test_abstract_model_matches_a_real_init(config):
    """abstract_model draws every init from one constant key (cheap under eval_shape); the
    parameter tree, shapes and dtypes must equal those of a model built with real nnx.Rngs."""
    from flax import nnx

    from cogvae.model import AutoencoderKLCogVideoX, abstract_model

    cfg = VAEConfig.from_diffusers_config(dict(diffusers_vae(seed=0, **config).config))
    # traced, not run: the same modules and nnx.Rngs draws as a real init, without executing them
    real = nnx.state(nnx.eval_shape(lambda: AutoencoderKLCogVideoX(cfg, rngs=nnx.Rngs(0))))
    abstract = nnx.state(abstract_model(cfg))
    shapes = lambda st: {p: (tuple(v.get_value().shape), v.get_value().dtype, type(v))  # noqa: E731
                         for p, v in nnx.to_flat_state(st)}
    assert shapes(abstract) == shapes(real)
