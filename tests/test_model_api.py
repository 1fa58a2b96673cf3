"""The model's public API against diffusers' ``AutoencoderKLCogVideoX``: every call or setting a
diffusers user makes has an equivalent here that gives the same result (or the same refusal).

The reference is diffusers itself (torch, CPU, random weights; see ``_ref``). One thing is faked:
in the sampling tests diffusers' ``randn_tensor`` (its only noise source) is patched to return the
noise JAX draws from the key given to cogvae, since torch's and JAX's random streams differ; all
the rest of diffusers' sampling code runs. The model is a micro config (two blocks of 4
channels, no resnets in the down blocks: 2x spatial and temporal compression) whose kernels
compile in about a second each; the tests share its few input shapes (encode 5 frames of 16x24,
decode their 3 latents), and every other case compiles one kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _ref import assert_parity, diffusers_vae, to_bcthw, to_bthwc, to_nnx
from cogvae.model import DecoderOutput, DiagonalGaussianDistribution

# layers_per_block=0 runs in diffusers and is checked against it in test_parity.py.
CONFIG = dict(block_out_channels=(4, 4), layers_per_block=0, norm_num_groups=2, latent_channels=4)


@functools.lru_cache(maxsize=None)
def pair():
    ref = diffusers_vae(seed=21, **CONFIG)
    return ref, to_nnx(ref)


@pytest.fixture(scope="module", autouse=True)
def _built():
    """Build the pair once, as set-up (its time is not any one test's)."""
    pair()


def video(frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, frames, 16, 24, generator=torch.Generator().manual_seed(seed))


def per_width(a) -> np.ndarray:
    """A (B, w) result of kl()/nll() as a (B, 1, 1, w, 1) 'video', so that assert_parity compares
    it with diffusers' (B, w) (reshaped to (B, 1, 1, 1, w)) within the fp32 contract."""
    return np.asarray(a)[:, None, None, :, None]


def as_ref(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], 1, 1, 1, t.shape[1])


@pytest.fixture
def jax_noise_in_diffusers(monkeypatch):
    """Make diffusers' posterior sampling draw the noise JAX draws from ``key`` (see module doc)."""
    import diffusers.models.autoencoders.vae as dvae

    state = {}

    def randn_tensor(shape, generator=None, device=None, dtype=None):
        noise = jax.random.normal(state["key"], (shape[0], *shape[2:], shape[1]), jnp.float32)
        return torch.from_numpy(np.ascontiguousarray(to_bcthw(noise))).to(dtype)

    monkeypatch.setattr(dvae, "randn_tensor", randn_tensor)
    return state


def test_encode_returns_diffusers_posterior():
    """encode(x): .latent_dist, return_dict=False, mode(), std, var, kl() (alone and against
    another posterior) and nll() give diffusers' values; (mean, logvar) unpacking still works."""
    ref, ours = pair()
    x, y = video(5, seed=1), video(5, seed=2)
    with torch.no_grad():
        dx, dy = ref.encode(x).latent_dist, ref.encode(y, return_dict=False)[0]
    post = ours.encode(to_bthwc(x))
    other = ours.encode(to_bthwc(y), return_dict=False)[0]
    assert isinstance(post, DiagonalGaussianDistribution) and post.latent_dist is post
    mean, logvar = post
    assert mean is post.mean and logvar is post.logvar
    assert_parity(post.latent_dist.mode(), dx.mode(), "posterior mode")
    assert_parity(post.logvar, dx.logvar, "posterior logvar")
    assert_parity(post.std, dx.std, "posterior std")
    assert_parity(post.var, dx.var, "posterior var")
    assert_parity(other.mean, dy.mean, "posterior return_dict=False")
    # diffusers reduces dims [1, 2, 3] of (B, C, t, h, w): the result is (B, w).
    assert post.kl().shape == tuple(dx.kl().shape) == (1, 12)
    assert_parity(per_width(post.kl()), as_ref(dx.kl()), "posterior kl()")
    assert_parity(per_width(post.kl(other)), as_ref(dx.kl(dy)), "posterior kl(other)")
    assert_parity(per_width(post.nll(other.mean)), as_ref(dx.nll(dy.mean)), "posterior nll(sample)")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_posterior_methods_keep_the_posterior_dtype_as_diffusers_does(dtype):
    """A reduced-precision posterior's kl(), nll(), mode(), std and var stay in its dtype, as
    diffusers' DiagonalGaussianDistribution's do (a bf16 loss stays bf16 in a training step)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Ref

    rng = np.random.default_rng(0)
    moments = rng.standard_normal((1, 8, 2, 3, 4), dtype=np.float32)  # (B, 2C, t, h, w)
    ref = Ref(torch.from_numpy(moments).to(getattr(torch, dtype)))
    post = DiagonalGaussianDistribution(*(jnp.asarray(m, dtype) for m in np.split(
        np.moveaxis(moments, 1, -1), 2, axis=-1)))
    sample = jnp.asarray(np.moveaxis(moments[:, :4], 1, -1), dtype)
    ours = {"kl": post.kl(), "nll": post.nll(sample), "mode": post.mode(), "std": post.std, "var": post.var}
    theirs = {"kl": ref.kl(), "nll": ref.nll(torch.from_numpy(moments[:, :4]).to(getattr(torch, dtype))),
              "mode": ref.mode(), "std": ref.std, "var": ref.var}
    assert {k: v.dtype.name for k, v in ours.items()} == {k: str(v.dtype).removeprefix("torch.")
                                                          for k, v in theirs.items()} == dict.fromkeys(ours, dtype)


def test_posterior_sample_matches_diffusers(jax_noise_in_diffusers):
    ref, ours = pair()
    x = video(5, seed=3)
    key = jax.random.key(4)
    jax_noise_in_diffusers["key"] = key
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    post = ours.encode(to_bthwc(x))
    assert_parity(post.latent_dist.sample(key), expected, "posterior sample(rng)")
    np.testing.assert_array_equal(np.asarray(post.sample(generator=key)), np.asarray(post.sample(key)))
    with pytest.raises(ValueError, match=r"sample\(\) needs rng"):
        post.sample()
    with pytest.raises(TypeError, match="not both"):
        post.sample(key, generator=key)


def test_forward_sample_posterior_and_return_dict_match_diffusers(jax_noise_in_diffusers):
    """vae(x, sample_posterior=True, generator=...) and decode's return_dict spellings."""
    ref, ours = pair()
    x = video(5, seed=5)
    key = jax.random.key(6)
    jax_noise_in_diffusers["key"] = key
    with torch.no_grad():
        sampled = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample
        plain = ref(x, return_dict=False)[0]
        z = ref.encode(x).latent_dist.mode()
        decoded = ref.decode(z, return_dict=False)[0]
    assert_parity(ours(to_bthwc(x), sample_posterior=True, generator=key), sampled, "forward sample_posterior")
    out = ours(to_bthwc(x), return_dict=True)
    assert isinstance(out, DecoderOutput)
    assert_parity(out.sample, plain, "forward return_dict=True")
    zj = to_bthwc(z)
    assert_parity(ours.decode(zj, return_dict=True).sample, decoded, "decode return_dict=True")
    (video_only,) = ours.decode(zj, return_dict=False)
    assert_parity(video_only, decoded, "decode return_dict=False")
    assert_parity(ours.decode(zj), decoded, "decode default: the array")
    # diffusers' positional order, forward(sample, sample_posterior, return_dict, generator):
    # ported code such as vae(x, False, False)[0] means here what it means there
    (positional,) = ours(to_bthwc(x), False, False)
    assert_parity(positional, plain, "forward(x, False, False)")
    assert_parity(ours(to_bthwc(x), True, True, key).sample, sampled, "forward(x, True, True, generator)")


@pytest.mark.parametrize(
    "op, attr, size, count",
    [("decode", "num_latent_frames_batch_size", 4, 5), ("encode", "num_sample_frames_batch_size", 16, 17)],
)
def test_frame_batch_sizes_are_honoured_as_in_diffusers(op, attr, size, count):
    """diffusers' frame batch sizes are attributes a user can set; both sides batch the same way.
    Here one batch of all frames instead of two (5 latents: 3 + 2; 17 frames: 9 + 8), a different
    result that compiles one kernel only."""
    ref, ours = pair()
    default = getattr(ref, attr)
    assert getattr(ours, attr) == default
    setattr(ref, attr, size)
    setattr(ours, attr, size)
    try:
        with torch.no_grad():
            if op == "decode":
                z = torch.randn(1, 4, count, 4, 6, generator=torch.Generator().manual_seed(7))
                expected, got = ref.decode(z).sample, ours.decode(to_bthwc(z))
            else:
                x = video(count, seed=8)
                expected, got = ref.encode(x).latent_dist.mean, ours.encode(to_bthwc(x)).mean
    finally:
        setattr(ref, attr, default)
        setattr(ours, attr, default)
    assert_parity(got, expected, f"{op} with {attr}={size}")


def test_tiling_attributes_read_and_assign_as_in_diffusers():
    """enable_tiling's defaults and arguments, and the tile_* attributes diffusers users assign:
    assigning a sample size keeps the latent size until the next enable_tiling(), as there."""
    ref, ours = pair()
    names = ["tile_sample_min_height", "tile_sample_min_width", "tile_latent_min_height", "tile_latent_min_width",
             "tile_overlap_factor_height", "tile_overlap_factor_width"]

    def same():
        assert {n: getattr(ours, n) for n in names} == {n: getattr(ref, n) for n in names}
        assert ours.use_tiling == ref.use_tiling

    saved = ours.tiling
    try:
        same()
        for m in (ref, ours):
            m.enable_tiling(16, 20, tile_overlap_factor_width=1 / 3)
        same()
        for m in (ref, ours):
            m.tile_sample_min_height = 24  # the latent tile height stays 4 in diffusers
            m.tile_overlap_factor_height = 1 / 4
        same()
        for m in (ref, ours):
            m.tile_latent_min_width = 3
        same()
        for m in (ref, ours):
            m.disable_tiling()
        same()
        for m in (ref, ours):
            m.enable_tiling()  # recomputes the latent sizes from the sample sizes
        same()
    finally:
        ref.disable_tiling()
        ours.disable_tiling()
        ours.tiling = saved
        ref.enable_tiling(saved.tile_sample_min_height, saved.tile_sample_min_width, 1 / 6, 1 / 5)
        ref.disable_tiling()


def test_assigned_tile_sizes_give_diffusers_tiled_encode():
    """A tile size assigned as an attribute is used, not silently ignored (one frame: one kernel)."""
    ref, ours = pair()
    saved = ours.tiling
    try:
        for m in (ref, ours):
            m.enable_tiling()
            m.tile_sample_min_height, m.tile_sample_min_width = 8, 12
            m.tile_overlap_factor_height, m.tile_overlap_factor_width = 1 / 4, 1 / 3
        # 12 x 16 pixels in 8 x 12 tiles every 6 rows and 8 columns: 2 x 2 tiles, edge tiles 6 x 8.
        x = torch.randn(1, 3, 1, 12, 16, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            expected = ref.encode(x).latent_dist.mean
        got = ours.encode(to_bthwc(x)).mean
    finally:
        ref.disable_tiling()
        ours.disable_tiling()
        ours.tiling = saved
        ref.enable_tiling(saved.tile_sample_min_height, saved.tile_sample_min_width, 1 / 6, 1 / 5)
        ref.disable_tiling()
    assert_parity(got, expected, "tiled encode with assigned tile attributes")


BAD_INPUTS = {
    # case: (method, diffusers' input (B, C, T, H, W) or None, ours, error, message)
    "diffusers layout": ("encode", None, np.zeros((1, 3, 5, 16, 24), np.float32), ValueError,
                         r"expected 3 channels .* this looks like diffusers' \(B, C, T, H, W\) layout"),
    "4 channels": ("encode", torch.zeros(1, 4, 5, 16, 24), np.zeros((1, 5, 16, 24, 4), np.float32), ValueError,
                   r"encode: expected 3 channels on the last axis"),
    "image without time axis": ("encode", torch.zeros(1, 3, 16, 24), np.zeros((1, 16, 24, 3), np.float32),
                                ValueError, r"expected a 5-D video .*an image is one frame"),
    "uint8 video": ("encode", torch.zeros(1, 3, 5, 16, 24, dtype=torch.uint8),
                    np.zeros((1, 5, 16, 24, 3), np.uint8), TypeError, r"expected a floating-point video, got dtype uint8"),
    "bool video": ("encode", torch.zeros(1, 3, 5, 16, 24, dtype=torch.bool), np.zeros((1, 5, 16, 24, 3), bool),
                   TypeError, r"floating-point video, got dtype bool"),
    "5 latent channels": ("decode", torch.zeros(1, 5, 2, 4, 6), np.zeros((1, 2, 4, 6, 5), np.float32), ValueError,
                          r"decode: expected 4 channels on the last axis"),
    "int latents": ("decode", torch.zeros(1, 4, 2, 4, 6, dtype=torch.int64), np.zeros((1, 2, 4, 6, 4), np.int32),
                    TypeError, r"floating-point latent, got dtype int32"),
    "rank-6 latents": ("decode", None, np.zeros((1, 1, 2, 4, 6, 4), np.float32), ValueError, r"expected a 5-D latent"),
    # an empty axis: diffusers raises; the model returned an empty video
    "latents of height 0": ("decode", torch.zeros(1, 4, 2, 0, 3), np.zeros((1, 2, 0, 3, 4), np.float32), ValueError,
                            r"decode: the \(B, t, h, w, C\) latent has no height: got shape \(1, 2, 0, 3, 4\)"),
    "no frames": ("encode", torch.zeros(1, 3, 0, 16, 24), np.zeros((1, 0, 16, 24, 3), np.float32), ValueError,
                  r"encode: the \(B, T, H, W, C\) video has no frames: got shape \(1, 0, 16, 24, 3\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_inputs_diffusers_refuses_are_refused_with_a_clear_error(case):
    """What diffusers refuses (wrong rank, channel count or a non-float dtype: JAX would promote an
    int video silently) is refused before anything is compiled, saying what to do."""
    method, theirs, mine, error, message = BAD_INPUTS[case]
    ref, ours = pair()
    if theirs is not None:
        with pytest.raises((RuntimeError, ValueError)), torch.no_grad():
            getattr(ref, method)(theirs)
    with pytest.raises(error, match=message):
        getattr(ours, method)(jnp.asarray(mine))
    if method == "encode":  # the other entry points check too
        with pytest.raises(error, match=message.replace("encode:", "")):
            ours(jnp.asarray(mine))


def test_to_dtype_is_a_model_loaded_in_that_dtype():
    """vae.to(dtype), as diffusers' .to(dtype): the same graph and parameters as a model loaded with
    dtype= and compute_dtype=, hence the same results (compared structurally: nothing compiles)."""
    ref, _ = pair()
    model = to_nnx(ref)
    assert model.to("bfloat16") is model
    loaded = to_nnx(ref, dtype="bfloat16", compute_dtype=jnp.bfloat16)
    (g1, s1), (g2, s2) = nnx.split(model), nnx.split(loaded)
    assert g1 == g2
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.to(jnp.float32, compute_dtype="bfloat16")  # parameters and compute apart, as load() allows
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert model.dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="not a floating-point dtype"):
        model.to(jnp.int8)


def test_config_reads_as_diffusers_frozen_dict_and_checkpointing_flag():
    ref, ours = pair()
    for key in ("scaling_factor", "invert_scale_latents", "shift_factor", "block_out_channels",
                "temporal_compression_ratio", "latent_channels", "force_upcast"):
        want = ref.config[key]
        want = tuple(want) if isinstance(want, list) else want
        assert ours.config[key] == getattr(ours.config, key) == ours.config.get(key) == want, key
    public = set(ref.config) - {"_class_name", "_diffusers_version", "_use_default_values"}
    assert set(dict(ours.config)) == public == {k for k, _ in ours.config.items()} and len(ours.config) == len(public)
    # what diffusers-style training scripts do to log or copy the config
    mine = {k: v for k, v in ours.config.items()}
    assert all(mine[k] == (tuple(v) if isinstance(v, list) else v) for k, v in ref.config.items() if k in public)
    assert list(ours.config.values()) == [ours.config[k] for k in ours.config.keys()]
    assert "scaling_factor" in ours.config and ours.config.get("nope", 1) == 1
    with pytest.raises(KeyError):
        ours.config["nope"]
    assert ours.is_gradient_checkpointing is ref.is_gradient_checkpointing is False
    ours.enable_gradient_checkpointing()
    try:
        assert ours.is_gradient_checkpointing is True
    finally:
        ours.disable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing is False


BAD_DTYPES = [(np.float64, ValueError, "float64 is not supported"),
              (jnp.float8_e4m3fn, ValueError, "float8_e4m3fn is not supported"),
              (jnp.int8, TypeError, "int8 is not a floating-point dtype"),
              ("half2", ValueError, "unknown dtype 'half2'"),
              # named, as strings: refused as the dtypes themselves are ("float64" was an "unknown dtype")
              ("float64", ValueError, "float64 is not supported"),
              ("int8", TypeError, "int8 is not a floating-point dtype"),
              # diffusers' vae.to("cuda"), ported as is: a device, said so
              ("cuda", ValueError, "'cuda' is a device, not a dtype: in JAX, arrays are placed with jax.device_put")]


@pytest.mark.parametrize("bad,error,message", BAD_DTYPES,
                         ids=["float64", "float8", "int8", "name", "float64-name", "int8-name", "device"])
def test_every_entry_point_refuses_the_same_dtypes_before_any_work(tmp_path, bad, error, message):
    """One check (cogvae.model.resolve_dtype) everywhere a dtype is taken: float64 used to give a
    float64 'compute dtype' whose convs silently lost their HIGHEST precision, float8 a checkpoint
    written and validated that load then refused, int8 an ml_dtypes error from deep inside."""
    from cogvae.converter import export_diffusers, load, save
    from cogvae.converter.convert import convert, default_source

    vae = load(default_source())
    calls = {"save": lambda: save(vae, tmp_path / "out", dtype=bad),
             "convert": lambda: convert(None, tmp_path / "out", dtype=bad, quiet=True),
             "export": lambda: export_diffusers(vae, tmp_path / "out", dtype=bad),
             "load dtype": lambda: load(default_source(), dtype=bad),
             "load compute_dtype": lambda: load(default_source(), compute_dtype=bad),
             "to": lambda: vae.to(bad),
             "to compute_dtype": lambda: vae.to(compute_dtype=bad)}
    for what, call in calls.items():
        with pytest.raises(error, match=message):
            call()
        assert not (tmp_path / "out").exists(), what
    assert vae.dtype == jnp.float32


@pytest.mark.parametrize("spelling,dtype", [("fp32", jnp.float32), ("BF16", jnp.bfloat16), ("half", jnp.float16),
                                            (np.float16, jnp.float16), (jnp.dtype("bfloat16"), jnp.bfloat16),
                                            # diffusers' vae.to(torch.bfloat16), ported as is
                                            (torch.bfloat16, jnp.bfloat16), (torch.float16, jnp.float16)])
def test_dtype_spellings_are_the_same_everywhere(spelling, dtype):
    from cogvae.converter import load
    from cogvae.converter.convert import default_source
    from cogvae.model import resolve_dtype

    assert resolve_dtype(spelling) is dtype
    a = load(default_source(), dtype=spelling, compute_dtype=spelling)
    b = load(default_source()).to(spelling)
    assert a.dtype is b.dtype is dtype
    assert {p.dtype for p in jax.tree.leaves(nnx.state(a, nnx.Param))} == {jnp.dtype(dtype)}


@pytest.mark.parametrize("kwargs", [{"dtype": jnp.float16}, {"compute_dtype": "float16"},
                                    {"dtype": "float32", "compute_dtype": "fp16"}], ids=["dtype", "compute", "both"])
def test_to_float16_refuses_weights_float16_cannot_hold(kwargs):
    """vae.to(float16) turned a finite float32 weight of 1e5 into Inf (a NaN decode, no error),
    while load(dtype="float16") and save(dtype="float16") refuse it by name. Now to() refuses it
    too, for the stored dtype and for the compute dtype (every kernel casts the weights to it),
    and leaves the model as it was."""
    from cogvae.converter import load
    from cogvae.converter.convert import default_source

    vae = load(default_source())
    bias = vae.decoder.conv_out.conv.bias
    bias[...] = bias[...].at[0].set(1e5)
    with pytest.raises(ValueError, match=r"overflow to Inf in float16[\s\S]*'decoder\.conv_out\.conv\.bias': 1 value"):
        vae.to(**kwargs)
    assert vae.dtype == jnp.float32 and bias[...].dtype == jnp.float32 and float(bias[...][0]) == 1e5
    assert vae.to(jnp.bfloat16).dtype == jnp.bfloat16  # bfloat16 holds it


def test_load_with_a_float16_compute_dtype_refuses_weights_float16_cannot_hold(tmp_path):
    """load(compute_dtype="float16") of float32 weights beyond 65504: every kernel would cast them
    to Inf (all-NaN outputs, no error); refused by name, for a checkpoint and a diffusers folder."""
    from cogvae.converter import export_diffusers, load, model_params
    from cogvae.converter.checkpoint import write_checkpoint
    from cogvae.converter.convert import default_source

    vae = load(default_source())
    params = dict(model_params(vae))
    params["encoder.conv_in.conv.bias"] = params["encoder.conv_in.conv.bias"].copy()
    params["encoder.conv_in.conv.bias"][0] = 1e5
    ckpt = write_checkpoint(tmp_path / "ckpt", params, vae.config, formats=("msgpack",))
    export_diffusers(ckpt, tmp_path / "diffusers")
    for source in (ckpt, tmp_path / "diffusers"):
        with pytest.raises(ValueError, match=r"overflow to Inf in float16[\s\S]*'encoder\.conv_in\.conv\.bias'"):
            load(source, compute_dtype="float16")
        assert load(source, compute_dtype="bfloat16").dtype is jnp.bfloat16


def test_lists_and_torch_tensors_are_read_as_arrays():
    """What diffusers users hold: a nested list or a CPU torch tensor in (B, t, h, w, C) gives the
    same video as the jax array; its real shape is checked (a list was reported as shape ()), and a
    tensor that cannot become an array says what to pass."""
    _, ours = pair()
    z = np.random.default_rng(3).standard_normal((1, 2, 3, 4, 4)).astype(np.float32)
    want = np.asarray(ours.decode(jnp.asarray(z)))
    np.testing.assert_array_equal(np.asarray(ours.decode(z.tolist())), want)
    np.testing.assert_array_equal(np.asarray(ours.decode(torch.from_numpy(z))), want)
    with pytest.raises(ValueError, match=r"decode: expected a 5-D latent .* got shape \(2, 3, 4, 4\)"):
        ours.decode(z[0].tolist())
    with pytest.raises(TypeError, match=r"decode: expected a latent array .* got Tensor .*x\.detach\(\)\.float\(\)\.cpu\(\)"):
        ours.decode(torch.from_numpy(z).requires_grad_())


@pytest.mark.parametrize("setting, message", [
    (dict(tile_sample_min_height=-16), "tile_sample_min_height must be a whole number >= 0, got -16"),
    (dict(tile_sample_min_width=16.5), "tile_sample_min_width must be a whole number >= 0, got 16.5"),
    (dict(tile_overlap_factor_height=1.0), r"tile_overlap_factor_height must be a number in \[0, 1\), got 1.0"),
    (dict(tile_overlap_factor_width=-0.1), r"tile_overlap_factor_width must be a number in \[0, 1\), got -0.1"),
    (dict(tile_latent_min_height=-1), "latent_min_height must be a whole number >= 0, got -1"),
])
def test_bad_tiling_settings_are_refused_when_set(setting, message):
    """diffusers takes any value and fails at the first tiled call ("range() arg 3 must not be
    zero"); here the setting is refused as it is made, named, and the old settings stay."""
    _, ours = pair()
    before = ours.tiling
    (name, value), = setting.items()
    with pytest.raises(ValueError, match=message):
        setattr(ours, name, value)
    assert ours.tiling == before


def test_a_tile_too_small_to_move_is_a_clear_error():
    """A tile of 1 pixel is 0 latents (this VAE's spatial compression is 2): the next tile would
    start 0 latents further (diffusers: "range() arg 3 must not be zero")."""
    _, ours = pair()
    saved = ours.tiling
    try:
        ours.enable_tiling(1, 1)
        with pytest.raises(ValueError, match="tiling: a tile height of 0 with overlap factor .* moves the next tile by 0"):
            ours.decode(jnp.zeros((1, 1, 2, 2, 4)))
    finally:
        ours.disable_tiling()
        ours.tiling = saved


@pytest.mark.parametrize("call, error", [
    (dict(tile_sample_min_height=-8), ValueError),
    (dict(tile_overlap_factor_width=1.5), ValueError),
    (dict(pad_tiles="false"), TypeError),
    (dict(pad_tiles=None, tile_sample_min_width=-1), ValueError),
    (dict(batch_tiles=1), TypeError),
], ids=["negative-height", "overlap-above-1", "pad-tiles-a-string", "negative-width", "batch-tiles-an-int"])
def test_a_refused_enable_tiling_changes_nothing(call, error):
    """enable_tiling turned tiling on before checking its arguments: a refused call left the model
    tiling with its old tile sizes (a later decode came out another size). ``pad_tiles`` was
    coerced with bool(), so "false" meant True."""
    _, ours = pair()
    before = (ours.use_tiling, ours.tiling)
    with pytest.raises(error):
        ours.enable_tiling(**call)
    assert (ours.use_tiling, ours.tiling) == before == (False, ours.tiling)
    ours.enable_tiling(pad_tiles=np.bool_(False))  # a NumPy bool is a bool
    try:
        assert ours.use_tiling and ours.tiling.pad_tiles is False
    finally:
        ours.disable_tiling()
        ours.tiling = before[1]


def test_eval_and_train_return_the_model_as_torch_does():
    """``vae = AutoencoderKLCogVideoX.from_pretrained(...).eval()`` is how diffusers users write it;
    NNX's eval() returns None, which left ``vae`` None."""
    ref, ours = pair()
    assert ref.eval() is ref and ours.eval() is ours
    assert ref.train() is ref and ours.train() is ours
    ref.eval()


# diffusers' axis d of (B, C, T, H, W) is axis THIS_AXIS[d] of (B, T, H, W, C)
THIS_AXIS = {0: 0, 1: 4, 2: 1, 3: 2, 4: 3}


def two_posteriors():
    """diffusers' and this model's posteriors of the same two videos: (dx, dy, post, other)."""
    ref, ours = pair()
    x, y = video(5, seed=1), video(5, seed=2)
    with torch.no_grad():
        dx, dy = ref.encode(x).latent_dist, ref.encode(y).latent_dist
    return dx, dy, ours.encode(to_bthwc(x)), ours.encode(to_bthwc(y))


@pytest.mark.parametrize("dims", [[1, 2, 3], [2, 3, 4], [1, 2, 3, 4], [-1], [3]])
def test_nll_takes_diffusers_dims(dims):
    """``nll(sample, dims)``, keyword or positional as in diffusers, numbers the axes as diffusers'
    (B, C, T, H, W) tensors do, so ported code reduces the same axes (a positional [1, 2, 3] used
    to be read in this layout: time, height and width instead of channels, time and height). The
    result is the sum over those axes of this layout (bit for bit), with diffusers' kept axes in
    this layout's order; its values are diffusers' for the default dims (other dims sum the same
    terms over more elements, where fp32 rounding of sums in the thousands exceeds the absolute
    bound made for O(1) outputs)."""
    dx, dy, post, other = two_posteriors()
    want = dx.nll(dy.mean, dims=dims)
    axes = tuple(THIS_AXIS[d % 5] for d in dims)
    exact = np.asarray(post.nll(other.mean, axis=axes))
    kept = [d for d in range(5) if d not in {d % 5 for d in dims}]  # diffusers' order of the kept axes
    assert exact.shape == tuple(want.shape[kept.index(d)] for d in sorted(kept, key=THIS_AXIS.get))
    for got in (post.nll(other.mean, dims=dims), post.nll(other.mean, dims)):
        np.testing.assert_array_equal(np.asarray(got), exact)
    if dims == [1, 2, 3]:
        assert_parity(per_width(post.nll(other.mean, dims)), as_ref(want), "posterior nll(sample, [1, 2, 3])")
    with pytest.raises(TypeError, match="not both"):
        post.nll(other.mean, dims=dims, axis=1)


@pytest.mark.parametrize("dims, error", [([5], IndexError), ([7], IndexError), ([-6], IndexError), ([1, 2, 1], RuntimeError),
                                          ([-1, 4], RuntimeError), ([1.0], TypeError), ([True], TypeError)])
def test_nll_refuses_dims_diffusers_refuses(dims, error):
    """torch refuses a dim outside [-5, 4] (IndexError) and a dim given twice (RuntimeError); cogvae
    took dims modulo 5, so dims=[5] summed the batch axis and a ported typo gave a loss of another
    shape without a word."""
    dx, dy, post, other = two_posteriors()
    if not isinstance(dims[0], (float, bool)):
        with pytest.raises(error):
            dx.nll(dy.mean, dims=dims)
    with pytest.raises(error, match="nll: "):
        post.nll(other.mean, dims=dims)


@pytest.mark.parametrize("dims", [None, [], ()], ids=["None", "empty-list", "empty-tuple"])
def test_nll_with_no_dims_sums_every_axis_as_diffusers(dims):
    """diffusers passes ``dims`` to ``torch.sum``, which reduces every axis for ``dim=None`` and
    for an empty list: a scalar. ``None`` used to mean the default [1, 2, 3] here, a (B, w) array,
    and an empty list reduced nothing. The value is one sum over every element (relative bound:
    the fp32 rounding of a sum of many terms, not the per-pixel absolute one)."""
    dx, dy, post, other = two_posteriors()
    want = dx.nll(dy.mean, dims=dims)
    for got in (post.nll(other.mean, dims=dims), post.nll(other.mean, dims)):
        assert got.shape == want.shape == ()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(post.nll(other.mean, axis=None)))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert post.nll(other.mean, axis=()).shape == post.mean.shape  # axis: NumPy's meaning, () keeps all
