"""The CogVideoX VAE in Flax NNX: Encoder3D, Decoder3D and AutoencoderKLCogVideoX.

Layout: videos are ``(B, T, H, W, C)`` with C = 3 and values in [-1, 1]; latents are
``(B, t, h, w, latent_channels)``. diffusers' tensors are ``(B, C, T, H, W)``: move axis 1 to the end.

Frame batching is part of the function, not an optimisation: GroupNorm statistics and temporal
pooling are computed per batch, and the causal-conv caches carry context across batches. So this
module reproduces diffusers' batching exactly:

* encode: batches of 8 frames; the remainder ``T % 8`` joins the *first* batch (``_encode``);
* decode: batches of 2 latent frames; an odd count puts 3 in the first batch (``_decode``).

Two execution paths compute the same thing. ``compiled=True`` (default) jit-compiles the first
batch and a ``jax.lax.scan`` over the remaining equal batches, with the conv caches as carry, so
compile time does not grow with the video length. ``compiled=False`` is a plain Python loop that
mirrors diffusers line by line; tests check the two against each other and against diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import VAEConfig
from .sharding import explicit_axes_hint
from .layers import CausalConv3d, Conv3d, DownBlock3D, GroupNorm, MidBlock3D, SpatialNorm3D, UpBlock3D, checkpointed, conv_impl_scope, double_valid, halve_valid, lowering

Array = jax.Array

__all__ = [
    "Encoder3D",
    "Decoder3D",
    "AutoencoderKLCogVideoX",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "TilingConfig",
    "compile_decode_first_batch",
    "SUPPORTED_DTYPES",
    "default_compute_dtype",
    "frame_batches",
    "resolve_dtype",
]

# diffusers: num_sample_frames_batch_size / num_latent_frames_batch_size. Other values give poor
# results, says diffusers, because the VAE was trained with these.
SAMPLE_FRAMES_BATCH = 8
LATENT_FRAMES_BATCH = 2


def default_compute_dtype(backend: str | None = None):
    """bf16 on accelerators, fp32 on CPU (where it is also the parity setting); ``backend``
    defaults to ``jax.default_backend()``."""
    return jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16


def frame_batches(num_frames: int, batch: int) -> list[tuple[int, int]]:
    """diffusers' frame-batch slices: ``max(T // batch, 1)`` batches, remainder in the first one.

    E.g. 49 frames, batch 8 -> [(0, 9), (9, 17), ..., (41, 49)]; 13 latents, batch 2 ->
    [(0, 3), (3, 5), ..., (11, 13)]; 5 frames, batch 8 -> [(0, 5)].
    """
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    n = max(num_frames // batch, 1)
    rem = num_frames % batch
    out = []
    for i in range(n):
        start = batch * i + (0 if i == 0 else rem)
        end = min(batch * (i + 1) + rem, num_frames)
        out.append((start, end))
    return out


class Encoder3D(nnx.Module):
    """diffusers ``CogVideoXEncoder3D``. x: (B, T, H, W, in_channels) -> (B, t, h, w, 2*latent)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, **kw)
        blocks = []
        out_ch = ch[0]
        for i in range(len(cfg.down_block_types)):
            in_ch, out_ch = out_ch, ch[i]
            blocks.append(
                DownBlock3D(
                    in_ch,
                    out_ch,
                    num_layers=cfg.layers_per_block,
                    eps=cfg.norm_eps,
                    groups=cfg.norm_num_groups,
                    add_downsample=i != len(ch) - 1,
                    compress_time=i < cfg.temporal_compress_level,
                    act_fn=cfg.act_fn,
                    **kw,
                )
            )
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock3D(
            ch[-1],
            num_layers=2,
            eps=cfg.norm_eps,
            groups=cfg.norm_num_groups,
            spatial_norm_dim=None,
            act_fn=cfg.act_fn,
            **kw,
        )
        # diffusers hard-codes eps=1e-6 here.
        self.norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], eps=1e-6, **kw)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: Array, cache: Optional[dict] = None, valid=None) -> tuple[Array, dict]:
        """x: one frame batch; cache: the previous batch's conv caches (None for the first)."""
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"), valid)
        for i, block in enumerate(self.down_blocks):
            key = f"down_block_{i}"
            h, new[key] = block(h, cache.get(key), valid)
            if block.downsamplers is not None:
                valid = halve_valid(valid)
        h, new["mid_block"] = self.mid_block(h, None, cache.get("mid_block"), valid)
        h = jax.nn.silu(self.norm_out(h, valid))  # diffusers' conv_act: nn.SiLU() whatever act_fn is
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"), valid)
        return h, new


class Decoder3D(nnx.Module):
    """diffusers ``CogVideoXDecoder3D``. z: (B, t, h, w, latent) -> (B, T, H, W, out_channels)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rch = tuple(reversed(cfg.block_out_channels))
        zc = cfg.latent_channels
        self.conv_in = CausalConv3d(zc, rch[0], 3, **kw)
        self.mid_block = MidBlock3D(
            rch[0],
            num_layers=2,
            eps=cfg.norm_eps,
            groups=cfg.norm_num_groups,
            spatial_norm_dim=zc,
            act_fn=cfg.act_fn,
            **kw,
        )
        blocks = []
        out_ch = rch[0]
        for i in range(len(cfg.up_block_types)):
            prev, out_ch = out_ch, rch[i]
            blocks.append(
                UpBlock3D(
                    prev,
                    out_ch,
                    num_layers=cfg.layers_per_block + 1,
                    eps=cfg.norm_eps,
                    groups=cfg.norm_num_groups,
                    spatial_norm_dim=zc,
                    add_upsample=i != len(rch) - 1,
                    compress_time=i < cfg.temporal_compress_level,
                    act_fn=cfg.act_fn,
                    **kw,
                )
            )
        self.up_blocks = nnx.List(blocks)
        self.norm_out = SpatialNorm3D(rch[-1], zc, groups=cfg.norm_num_groups, **kw)
        self.conv_out = CausalConv3d(rch[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: Array, cache: Optional[dict] = None, valid=None) -> tuple[Array, dict]:
        """z: one latent batch (also the SpatialNorm condition); cache as in Encoder3D."""
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"), valid)
        h, new["mid_block"] = self.mid_block(h, z, cache.get("mid_block"), valid)
        for i, block in enumerate(self.up_blocks):
            key = f"up_block_{i}"
            h, new[key] = block(h, z, cache.get(key), valid)
            if block.upsamplers is not None:
                valid = double_valid(valid)
        h, new["norm_out"] = self.norm_out(h, z, cache.get("norm_out"), valid)
        h = jax.nn.silu(h)  # diffusers' conv_act: nn.SiLU() whatever act_fn is
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"), valid)
        return h, new


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """diffusers' tiling settings: tiles of half the sample size, overlap factors 1/6 and 1/5."""

    tile_sample_min_height: int
    tile_sample_min_width: int
    tile_overlap_factor_height: float = 1 / 6
    tile_overlap_factor_width: float = 1 / 5
    spatial_compression: int = 8
    # True: every tile is zero-padded to the full tile size and masked, so all tiles share one
    # compiled function. False: each tile runs at its own size, one compiled function per distinct
    # tile shape (the full tile plus the partial ones of the last rows and columns: 4 shapes at 2b
    # scale); no padded area is computed, which at 2b scale is 38% less work (tiles covering
    # 70x108 latent rows x columns instead of 90x135), at the price of those extra compiles.
    pad_tiles: bool = True
    # With pad_tiles False: run tiles of one shape stacked along the batch axis, as many at a
    # time as fit in one full tile's pixels (see AutoencoderKLCogVideoX._run_exact_tiles).
    batch_tiles: bool = True
    # diffusers keeps the latent tile sizes as attributes of their own: __init__ and enable_tiling
    # derive them from the sample sizes, but assigning ``vae.tile_sample_min_height`` afterwards
    # leaves them as they were (and assigning ``vae.tile_latent_min_height`` sets them alone).
    # None: derived from the sample sizes; an int: such a separately kept value.
    latent_min_height: Optional[int] = None
    latent_min_width: Optional[int] = None

    def __post_init__(self):
        # diffusers takes any value and fails at the first tiled call ("range() arg 3 must not be
        # zero", "need at least one array to concatenate"); a setting is refused here, named.
        problems = []
        for name in ("tile_sample_min_height", "tile_sample_min_width", "latent_min_height", "latent_min_width"):
            v = getattr(self, name)
            if v is None and name.startswith("latent"):
                continue
            # 0 is what a config with sample_height 1 derives (sample_height // 2), as in diffusers:
            # such a model is built, and only a tiled call is refused (by _tiled)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                problems.append(f"{name} must be a whole number >= 0, got {v!r}")
        for name in ("tile_overlap_factor_height", "tile_overlap_factor_width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 <= v < 1:
                problems.append(f"{name} must be a number in [0, 1), got {v!r}")
        for name in ("pad_tiles", "batch_tiles"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):  # as enable_tiling accepts them
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("tiling: " + "; ".join(problems))

    @property
    def tile_latent_min_height(self) -> int:
        if self.latent_min_height is not None:
            return self.latent_min_height
        return int(self.tile_sample_min_height / self.spatial_compression)

    @property
    def tile_latent_min_width(self) -> int:
        if self.latent_min_width is not None:
            return self.latent_min_width
        return int(self.tile_sample_min_width / self.spatial_compression)


# diffusers' DiagonalGaussianDistribution reduces kl() and nll() over its dims [1, 2, 3]. It was
# written for images (B, C, H, W); on a video latent (B, C, T, H, W) those are C, T and H, so the
# result keeps the batch and the *width* axis: shape (B, w). In this layout (B, t, h, w, C) the same
# axes are 4, 1 and 2, which leave (B, w) in the same order: a KL loss ported from diffusers gives
# the same numbers.
DIFFUSERS_REDUCED_AXES = (1, 2, 4)
# diffusers' axis d of a (B, C, T, H, W) tensor is axis _FROM_DIFFUSERS_AXIS[d] of (B, T, H, W, C).
_FROM_DIFFUSERS_AXIS = (0, 4, 1, 2, 3)
# nll()'s defaults: None is a value there (every axis, as torch.sum(dim=None) in diffusers)
_DEFAULT_DIMS = object()
_NO_AXIS = object()


def _key(rng, generator, what: str):
    """The PRNG key given as ``rng`` or under diffusers' name ``generator`` (exactly one of them)."""
    if rng is not None and generator is not None:
        raise TypeError(f"{what}: pass the PRNG key as rng or as generator, not both")
    key = rng if rng is not None else generator
    if key is None:
        # diffusers draws from torch's global RNG when no generator is given; JAX has none.
        raise ValueError(f"{what} needs rng (a jax.random key; diffusers' generator=)")
    return key


class DiagonalGaussianDistribution(NamedTuple):
    """What ``encode`` returns: diffusers' ``DiagonalGaussianDistribution`` of the latents.

    It is a ``(mean, logvar)`` tuple (``mean, logvar = vae.encode(x)``; a pytree, so it can be
    returned from ``jax.jit``), with diffusers' methods: ``sample(rng)``, ``mode()``, ``kl()``,
    ``nll()``, ``std``, ``var``. ``latent_dist`` is the distribution itself, so diffusers'
    ``vae.encode(x).latent_dist.sample(...)`` reads the same. logvar is already clamped to
    [-30, 20], as diffusers clamps it. One difference: ``vae.encode(x)[0]`` is the mean here, not
    the distribution (use ``vae.encode(x).latent_dist`` or ``encode(x, return_dict=False)[0]``).
    """

    mean: Array
    logvar: Array

    @property
    def latent_dist(self) -> "DiagonalGaussianDistribution":
        """diffusers' ``AutoencoderKLOutput.latent_dist``: this distribution."""
        return self

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def mode(self) -> Array:
        return self.mean

    def sample(self, rng: Optional[jax.Array] = None, *, generator: Optional[jax.Array] = None) -> Array:
        """``mean + std * N(0, 1)``, the noise drawn from the jax.random key ``rng`` (diffusers'
        ``generator``) in the latents' dtype, as diffusers draws it in theirs."""
        key = _key(rng, generator, "sample()")
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> Array:
        """diffusers' ``kl``: against N(0, 1), or against ``other``; reduced over the axes diffusers
        reduces (channels, time, height: see ``DIFFUSERS_REDUCED_AXES``), so the result is (B, w)."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=DIFFUSERS_REDUCED_AXES)

    def nll(self, sample: Array, dims: Any = _DEFAULT_DIMS, *, axis: Any = _NO_AXIS) -> Array:
        """diffusers' ``nll(sample, dims=[1, 2, 3])``: ``dims`` numbers the axes as diffusers' (B, C,
        T, H, W) tensors do, so a call ported from diffusers (keyword or positional) reduces the
        same axes; the result keeps the others in this layout's order (B, T, H, W, C). Or
        ``axis``: the axes of this layout directly (``None``: all, as in NumPy). Default:
        diffusers' [1, 2, 3], a (B, w) result (see ``DIFFUSERS_REDUCED_AXES``). ``dims=None`` or an
        empty ``dims`` sums every axis to a scalar, as ``torch.sum`` does with them in diffusers."""
        if dims is not _DEFAULT_DIMS and axis is not _NO_AXIS:
            raise TypeError("nll: pass dims (diffusers' axis numbers) or axis (this layout's), not both")
        if axis is _NO_AXIS:
            dims = (1, 2, 3) if dims is _DEFAULT_DIMS else dims
            if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
                # torch.sum(x, dim=None) and torch.sum(x, dim=[]) both reduce every axis
                axis = None
            else:
                dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
                axis = tuple(_FROM_DIFFUSERS_AXIS[_diffusers_dim(d) % 5] for d in dims)
                if len(set(axis)) != len(axis):  # torch refuses a dim given twice (-1 and 4 are one dim)
                    raise RuntimeError(f"nll: a dim appears more than once in dims {list(dims)}")
        # a Python float (weakly typed, as diffusers' NumPy scalar is to torch): a bf16 posterior gives a bf16 nll
        terms = float(np.log(2.0 * np.pi)) + self.logvar + jnp.square(sample - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=axis)


def _diffusers_dim(d: Any) -> int:
    """One of diffusers' axis numbers of a (B, C, T, H, W) tensor, checked as torch checks it: an
    integer in [-5, 4] (a wrapped-around 7 or -6 would reduce another axis without a word)."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise TypeError(f"nll: dims must be integers (diffusers' axis numbers), got {d!r}")
    if not -5 <= d <= 4:
        raise IndexError(f"nll: dimension out of range (expected to be in range of [-5, 4], but got {d})")
    return int(d)


class DecoderOutput(NamedTuple):
    """diffusers' ``DecoderOutput``: what ``decode(z, return_dict=True)`` returns (``.sample``)."""

    sample: Array


# ----------------------------------------------------------------------------- compiled kernels
# Module-level jitted functions keyed on the (static, hashable) graphdef: one compile per model
# structure and input shape, shared by every call, by every tile and by models with equal structure.
# ``valid`` is None (untiled) or the (h, w) valid region of a padded tile, as traced int32 scalars,
# so all tiles share one compiled function. The conv caches are donated to the scan, which returns
# its final carry: only an input buffer with a matching output can be donated (XLA aliases the two),
# so the carry is updated in place in the first batch's cache buffers instead of in a second copy
# (at 2b scale that copy was 2.6 GiB in bf16; a scan returning only the video made JAX drop the
# donation with a warning).
TRACE_COUNTS: dict[str, int] = {"encode_first": 0, "encode_scan": 0, "decode_first": 0, "decode_scan": 0}


def _apply_quant(vae, h):
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def _apply_post_quant(vae, z):
    return vae.post_quant_conv(z) if vae.post_quant_conv is not None else z


def _encode_step(vae, x, cache, valid):
    """One encoder frame batch (diffusers ``_encode`` loop body): -> (moments, new cache)."""
    h, cache = vae.encoder(x, cache, valid)
    return _apply_quant(vae, h), cache


def _decode_step(vae, z, cache, valid):
    """One decoder latent batch (diffusers ``_decode`` loop body): -> (video, new cache)."""
    return vae.decoder(_apply_post_quant(vae, z), cache, valid)


_STEPS = {"encode": _encode_step, "decode": _decode_step}


def _batch_step(vae, kind: str):
    """``fn(x, cache, valid) -> (out, new cache)``: one frame batch of ``kind``. With gradient
    checkpointing, the whole batch is checkpointed: a gradient keeps only each batch's input and
    conv caches, and recomputes the batch (its resnets checkpointed in turn) in the backward pass."""
    step = _STEPS[kind]
    if vae.gradient_checkpointing:
        return lambda x, cache, valid: checkpointed(step, vae, x, cache, valid)
    return lambda x, cache, valid: step(vae, x, cache, valid)


class _KernelView(nnx.Module):
    """What the ``kind`` kernels read of a VAE, and nothing else: the encoder and quant_conv, or
    the decoder and post_quant_conv (the same modules, shared), and whether batches are
    checkpointed. The kernels are keyed on the graphdef they are given; the whole VAE's also
    holds its slicing, tiling and frame-batch settings, so toggling ``enable_slicing()``, or
    tiling on and off, compiled the untiled kernels again. (The kernels also take a whole VAE's
    graphdef and state, as ``compile_decode_first_batch`` and the benchmarks pass them.)"""

    def __init__(self, vae, kind: str):
        if kind == "encode":
            self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        else:
            self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv
        self.gradient_checkpointing = vae.gradient_checkpointing


def kernel_split(vae, kind: str):
    """(graphdef, state) of what the ``kind`` ("encode" or "decode") kernels read of ``vae`` (a
    model or an abstract one): the arguments ``encode``/``decode`` call them with."""
    return nnx.split(_KernelView(vae, kind))


def _first_fn(kind, impl, graphdef, state, x, valid):
    """The first batch of ``kind``, with no cache (causal padding repeats the first frame)."""
    TRACE_COUNTS[f"{kind}_first"] += 1
    with conv_impl_scope(impl):
        return _batch_step(nnx.merge(graphdef, state), kind)(x, None, valid)


def _scan_fn(kind, impl, graphdef, state, xs, cache, valid):
    """xs: (N, B, frames, H, W, C) equal batches; cache: the carry from the batch before.

    Returns (outputs (N, B, frames', H', W', C'), the final cache); the cache is returned so that
    the donated input cache has an output to alias (see above)."""
    TRACE_COUNTS[f"{kind}_scan"] += 1
    with conv_impl_scope(impl):
        step = _batch_step(nnx.merge(graphdef, state), kind)

        def body(c, x):
            out, c = step(x, c, valid)
            return c, out

        cache, outs = jax.lax.scan(body, cache, xs)
    return outs, cache


# The XLA options each compiled kernel is built with, per backend (``jax.default_backend()``):
#
# - Region-based copy insertion (scan only). XLA copies a while loop's carried buffers when its
#   default (ordering-based) analysis cannot prove that an old conv cache is read before the new
#   one overwrites it; the new cache is a slice that XLA fuses away from the conv input it reads.
#   The region-based analysis proves more and drops some of those copies: for the 2b decode scan
#   (fp32, CPU) the compile-time total falls from 18.2 to 17.2 GiB.
# - No latency-hiding scheduler (GPU, both kernels). On one GPU the kernels have no collectives or
#   host transfers to overlap, and the scheduler's reordering keeps activations of several layers
#   alive at once. XLA's compile-time memory of the 2b decode scan for an H200 (jax 0.11.2, bf16,
#   13x60x90 latents; bench/bench_memory.py --target h200) falls from 11.23 to 6.99 GiB, and at
#   CogVideoX 1.5 scale (21x96x170) from 29.96 to 19.91 GiB; the first batch is unchanged.
#
# An option this jaxlib does not know is left out (checked once per option on a trivial function),
# so a renamed XLA flag costs memory, never a failed compile.
KERNEL_COMPILER_OPTIONS = {  # backend -> kernel -> {option: value}
    "cpu": {"first": {}, "scan": {"xla_cpu_copy_insertion_use_region_analysis": True}},
    "gpu": {
        "first": {"xla_gpu_enable_latency_hiding_scheduler": False},
        "scan": {"xla_gpu_copy_insertion_use_region_analysis": True, "xla_gpu_enable_latency_hiding_scheduler": False},
    },
}


@functools.lru_cache(maxsize=None)
def _option_known(name: str, value) -> bool:
    try:
        jax.jit(lambda v: v + 1, compiler_options={name: value}).lower(jnp.float32(0)).compile()  # default backend
    except Exception:  # an option this jaxlib's XLA does not have
        return False
    return True


def kernel_compiler_options(backend: str, kernel: str, *, check: bool = True) -> dict:
    """The XLA options ``kernel`` ("first" or "scan") is compiled with on ``backend``; with ``check``,
    only those the default backend's compiler accepts (``check=False`` for compiling for another
    target, e.g. bench/bench_memory.py --target)."""
    opts = KERNEL_COMPILER_OPTIONS.get(backend, {}).get(kernel, {})
    return {k: v for k, v in opts.items() if not check or _option_known(k, v)}


def compiler_options(backend: str | None = None) -> dict:
    """The XLA options cogvae's scan kernels are compiled with on ``backend`` (default: the default
    backend); the first-batch kernel's are a subset. Called inside your ``jax.jit`` / ``nnx.jit``,
    encode and decode are compiled as part of your program, with your jit's options: pass these
    (``jax.jit(f, compiler_options=...)``) to keep the kernels' memory behaviour there (on GPUs:
    no latency-hiding scheduler)."""
    return kernel_compiler_options(backend or jax.default_backend(), "scan")


def make_kernels(backend: str, *, check: bool = True, nested: bool = False) -> dict:
    """The two jitted kernels, with ``backend``'s compiler options.

    ``nested=True``: the kernels for a call traced by a caller's transformation (their ``jax.jit``
    or ``nnx.jit``, ``jax.grad``, ...). JAX accepts compiler options only on a top-level jit and
    raises on a nested one, and a nested jit is compiled as part of the caller's program anyway,
    with the caller's options; its donations mean nothing there either. So these carry neither.
    """
    # Static arguments: kind, the ``lowering()`` key (conv impl and tail read, so a changed
    # COGVAE_CONV_IMPL or layers.TAIL_READ compiles anew rather than reusing a function traced for
    # another lowering) and graphdef.
    # Every backend donates the cache (jax's CPU client aliases donated buffers too).
    if nested:
        return {"first": jax.jit(_first_fn, static_argnums=(0, 1, 2)),
                "scan": jax.jit(_scan_fn, static_argnums=(0, 1, 2))}
    first = kernel_compiler_options(backend, "first", check=check)
    scan = kernel_compiler_options(backend, "scan", check=check)
    return {
        "first": jax.jit(_first_fn, static_argnums=(0, 1, 2), compiler_options=first or None),
        "scan": jax.jit(_scan_fn, static_argnums=(0, 1, 2), donate_argnums=(5,), compiler_options=scan or None),
    }


@functools.lru_cache(maxsize=None)
def _kernels(backend: str, nested: bool = False) -> dict:
    return make_kernels(backend, nested=nested)


def kernels(*, nested: bool = False) -> dict:
    """The default backend's kernels; ``nested``: for a call inside a caller's transformation."""
    return _kernels(jax.default_backend(), nested)


def traced(*trees) -> bool:
    """Whether this call is being traced by a transformation (a caller's jit, grad, vmap, ...), so
    that the kernels it calls are nested in the caller's program (see ``make_kernels``)."""
    # JAX's own test sees every transformation, also around concrete inputs (arrays a caller's jit
    # closes over). It is internal; where it is missing, a tracer among the inputs is the sign.
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # pragma: no cover - a jax without it
        return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))
    return not trace_state_clean()


def compile_decode_first_batch(graphdef, state, latent_shape, latent_dtype=jnp.float32, *, impl: str | None = None):
    """Ahead-of-time compile of the decoder's first latent batch, from shapes alone.

    ``state``: the model's ``nnx.State`` with arrays or ``jax.ShapeDtypeStruct`` leaves (e.g. from
    ``nnx.split(abstract_model(config))``); ``latent_shape``: (B, t, h, w, latent) with t <= 3, so
    that ``decode`` runs exactly this one kernel (diffusers decodes up to 3 latents in its first
    batch). Returns ``fn(state, z) -> video (B, T, H, W, out)``, the same compiled kernel ``decode``
    uses. Compiling before the weights are loaded keeps the compiler's transient memory apart
    from the weights' (the converter's validation relies on this).
    """
    if latent_shape[1] > 3:
        raise ValueError(f"the first decode batch holds at most 3 latent frames, got {latent_shape}")
    impl = lowering(impl)
    avals = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    z = jax.ShapeDtypeStruct(tuple(latent_shape), latent_dtype)
    compiled = kernels()["first"].lower("decode", impl, graphdef, avals, z, None).compile()

    def run(state, z: Array) -> Array:
        video, _cache = compiled(state, z, None)
        return video

    return run


def _partitioned(x) -> bool:
    """Whether ``x`` is a concrete array split over several devices, so that the kernels it goes
    into are partitioned (GSPMD). A tracer (decode inside a caller's jit) says nothing: False."""
    try:
        sharding = x.sharding
    except AttributeError:
        return False
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


def _unstack_batches(ys: Array) -> Array:
    """(N, B, t, ...) scan outputs -> (B, N*t, ...) frames in order."""
    n, b, t = ys.shape[:3]
    return jnp.moveaxis(ys, 0, 1).reshape(b, n * t, *ys.shape[3:])


def _stack_batches(x: Array, start: int, size: int) -> Array:
    """(B, T, ...) frames from ``start`` on -> (N, B, size, ...) equal batches."""
    rest = x[:, start:]
    b, t = rest.shape[:2]
    return jnp.moveaxis(rest.reshape(b, t // size, size, *rest.shape[2:]), 1, 0)


#: The dtypes parameters are stored and computed in (float64 would drop the convs' HIGHEST
#: precision, which the kernels set for float32 only; float8 has no kernels), with the names
#: load(), save(), export_diffusers(), convert() and vae.to() all accept for them.
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: Any, name: str = "dtype"):
    """None, or ``dtype`` (a dtype, a name: float32/fp32, bfloat16/bf16, float16/fp16/half, or
    torch's dtype of that name, as ported diffusers code passes it) as the jnp scalar type (``jnp.bfloat16``, ...) of one of the supported dtypes. Not a dtype or not
    floating: TypeError; another floating dtype (float64, float8) or an unknown name: ValueError.
    One check for every entry point, so a dtype refused by one is refused by all, before any work."""
    if dtype is None:
        return None
    if type(dtype).__module__ == "torch" and str(dtype).startswith("torch."):
        # diffusers code ported as is (vae.to(torch.bfloat16)): the same dtype by its name, without
        # importing torch
        dtype = str(dtype)[len("torch."):]
    if isinstance(dtype, str):
        canonical = _DTYPE_NAMES.get(dtype.lower())
        if canonical is not None:
            return getattr(jnp, canonical)
        if dtype.lower().split(":")[0] in ("cpu", "cuda", "gpu", "tpu", "mps", "xpu"):
            raise ValueError(f"{name}: {dtype!r} is a device, not a dtype: in JAX, arrays are placed with "
                             "jax.device_put (cogvae.model.replicate puts the weights on a mesh's devices)")
        try:  # a dtype numpy knows ("float64"): refused below as the dtype itself is
            dtype = jnp.dtype(dtype)
        except TypeError:
            raise ValueError(f"{name}: unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: {dtype!r} is not a dtype") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name}: {dt} is not a floating-point dtype; use float32, bfloat16 or float16")
    if dt.name not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: {dt} is not supported; use float32, bfloat16 or float16")
    # The jnp scalar type, as default_compute_dtype() gives it: the compute dtype is part of the
    # static structure the kernels are cached on.
    return getattr(jnp, dt.name)


@functools.partial(jax.jit, static_argnums=1)
def _overflow_counts(params, target):
    """Per parameter: how many finite values become +-Inf when cast to ``target``."""
    return jax.tree.map(lambda p: jnp.sum(jnp.isfinite(p) & ~jnp.isfinite(p.astype(target))), params)


def _refuse_overflow(params, target) -> None:
    """ValueError naming every parameter with a finite value that ``target`` cannot hold."""
    counts = _overflow_counts(params, target)
    bad = [(".".join(map(str, path)), int(n.get_value() if hasattr(n, "get_value") else n))
           for path, n in nnx.to_flat_state(counts)]
    bad = [(k, n) for k, n in bad if n]
    if bad:
        name = jnp.dtype(target).name
        raise ValueError(f"cannot compute or store in {name}: {len(bad)} parameter(s) hold finite values that "
                         f"overflow to Inf in {name} (largest {name}: {float(jnp.finfo(target).max):g}):\n"
                         + "\n".join(f"  - parameter {k!r}: {n} value(s)" for k, n in bad))


def _as_array(x, method: str, what: str):
    """A jax or numpy array (or tracer) as is; anything else array-like (a nested list, a CPU
    torch tensor, as diffusers users hold them) as a numpy array, so that its real shape is checked
    and named; what cannot be one (a torch tensor that needs grad, on a GPU) is a TypeError that
    says what to pass."""
    if isinstance(x, (jax.Array, np.ndarray)):  # (a tracer is a jax.Array)
        return x
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 -- torch's own refusals (grad, device) say why
        raise TypeError(f"{method}: expected a {what} array (jax or numpy), got {type(x).__name__} that cannot be "
                        f"read as one ({e}); pass e.g. jnp.asarray(x.detach().float().cpu().numpy())") from None


def _check_input(x, channels: int, method: str, what: str, layout: str):
    """Refuse inputs diffusers refuses, with a message that says what to do; returns ``x`` as an
    array (see ``_as_array``).

    diffusers raises for a tensor that is not 5-D and for a wrong channel count; without this the
    JAX model would report a wrong rank or layout as a conv feature mismatch or as a too-small
    width, or, for an image without its time axis, misread it. An integer or bool tensor (uint8
    video frames, say) makes diffusers' conv raise ("Input type ... and bias type ... should be the
    same"); JAX would silently promote it and return garbage, as the model expects values in
    [-1, 1]. An empty axis other than the batch is refused too: diffusers raises for it, and the
    model would return an empty array. Only shapes and dtypes are read, so this works on tracers too.
    """
    x = _as_array(x, method, what)
    shape = tuple(x.shape)
    if len(shape) != 5:
        hint = f" (an image is one frame: {what}[:, None])" if len(shape) == 4 else ""
        raise ValueError(f"{method}: expected a 5-D {what} {layout}, got shape {shape}{hint}")
    if shape[-1] != channels:
        hint = ""
        if shape[1] == channels:
            hint = "; this looks like diffusers' (B, C, T, H, W) layout: move axis 1 last (jnp.moveaxis(x, 1, -1))"
        raise ValueError(
            f"{method}: expected {channels} channels on the last axis of the {layout} {what}, got shape {shape}{hint}"
        )
    empty = [name for name, n in zip(("frames", "height", "width"), shape[1:4]) if n == 0]
    if empty:
        raise ValueError(f"{method}: the {layout} {what} has no {' and no '.join(empty)}: got shape {shape}")
    dt = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{method}: expected a floating-point {what}, got dtype {dt} (diffusers refuses it too); "
            + ("scale video frames to [-1, 1] first, e.g. x.astype(jnp.float32) / 127.5 - 1"
               if what == "video" else "cast it to a float dtype")
        )
    return x


def _decoder_output(video: Array, return_dict: Optional[bool]):
    """The array (cogvae's default), diffusers' DecoderOutput (True) or its ``(video,)`` (False)."""
    if return_dict is None:
        return video
    return DecoderOutput(video) if return_dict else (video,)


def _tiling_attribute(name: str, setting: Optional[str] = None) -> property:
    """diffusers' tiling attribute ``name`` (``vae.tile_sample_min_height = 128``): reads
    ``vae.tiling.<name>``, and an assignment goes through ``_set_tiling(<setting or name>=value)``."""
    return property(lambda self: getattr(self.tiling, name),
                    lambda self, value: self._set_tiling(**{setting or name: value}),
                    doc=f"diffusers' ``{name}``: read and set through ``vae.tiling``.")


class AutoencoderKLCogVideoX(nnx.Module):
    """diffusers ``AutoencoderKLCogVideoX`` in NNX, with the same module tree and results.

    Args:
      config: the architecture (``VAEConfig``; see ``VAEConfig.from_diffusers_config``).
      dtype: compute dtype; None picks bf16 on GPU/TPU and fp32 on CPU. Use fp32 for parity.
      param_dtype: dtype of freshly initialised parameters (loaded ones keep theirs).
      rngs: keyword-only parameter RNGs.
    """

    def __init__(self, config: VAEConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        dtype = default_compute_dtype() if dtype is None else dtype
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder3D(config, **kw)
        self.decoder = Decoder3D(config, **kw)
        oc = config.out_channels
        # diffusers sizes both by out_channels (VAEConfig enforces latent_channels == out_channels).
        self.quant_conv = Conv3d(2 * oc, 2 * oc, (1, 1, 1), **kw) if config.use_quant_conv else None
        self.post_quant_conv = Conv3d(oc, oc, (1, 1, 1), **kw) if config.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        self.gradient_checkpointing = False
        # diffusers' frame batch sizes, attributes a user may set there (diffusers warns that the
        # VAE was trained with these values only); encode and decode honour them as diffusers does.
        self.num_latent_frames_batch_size = LATENT_FRAMES_BATCH
        self.num_sample_frames_batch_size = SAMPLE_FRAMES_BATCH
        self.tiling = TilingConfig(
            tile_sample_min_height=config.sample_height // 2,
            tile_sample_min_width=config.sample_width // 2,
            spatial_compression=config.spatial_compression,
        )

    # ------------------------------------------------------------------ diffusers' tiling attributes
    # diffusers keeps its tiling settings as plain attributes that users read and assign
    # (``vae.tile_sample_min_height = 256``). Here they live in ``self.tiling``; these properties
    # read and assign them there, so such an assignment is honoured rather than silently creating
    # an attribute nothing reads. Assigning a sample size keeps the latent size, as in diffusers.
    def _set_tiling(self, **changes) -> None:
        t = self.tiling
        changes.setdefault("latent_min_height", t.tile_latent_min_height)
        changes.setdefault("latent_min_width", t.tile_latent_min_width)
        self.tiling = dataclasses.replace(t, **changes)

    # diffusers users assign these attributes directly; each reads and sets the tiling settings.
    tile_sample_min_height = _tiling_attribute("tile_sample_min_height")
    tile_sample_min_width = _tiling_attribute("tile_sample_min_width")
    tile_latent_min_height = _tiling_attribute("tile_latent_min_height", "latent_min_height")
    tile_latent_min_width = _tiling_attribute("tile_latent_min_width", "latent_min_width")
    tile_overlap_factor_height = _tiling_attribute("tile_overlap_factor_height")
    tile_overlap_factor_width = _tiling_attribute("tile_overlap_factor_width")

    # ------------------------------------------------------------------ switches (diffusers API)
    def enable_tiling(
        self,
        tile_sample_min_height: Optional[int] = None,
        tile_sample_min_width: Optional[int] = None,
        tile_overlap_factor_height: Optional[float] = None,
        tile_overlap_factor_width: Optional[float] = None,
        *,
        pad_tiles: Optional[bool] = None,
        batch_tiles: Optional[bool] = None,
    ) -> None:
        """diffusers' ``enable_tiling`` (same arguments and defaults), plus ``pad_tiles``: True
        (the default) pads edge tiles to the full tile size so one compiled function serves every
        tile; False runs each tile at its own size (less work; one compile per distinct tile
        shape). With ``pad_tiles=False``, ``batch_tiles`` (default True) runs equal-shaped small
        tiles together along the batch axis, within one full tile's pixels. All give diffusers'
        tiled result. None keeps the current setting."""
        for name, v in (("pad_tiles", pad_tiles), ("batch_tiles", batch_tiles)):
            if v is not None and not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"enable_tiling({name}=...): True or False, not {v!r}")
        t = self.tiling
        # checked (TilingConfig) before anything changes: a refused call leaves tiling as it was
        self.tiling = TilingConfig(
            tile_sample_min_height=tile_sample_min_height or t.tile_sample_min_height,
            tile_sample_min_width=tile_sample_min_width or t.tile_sample_min_width,
            tile_overlap_factor_height=tile_overlap_factor_height or t.tile_overlap_factor_height,
            tile_overlap_factor_width=tile_overlap_factor_width or t.tile_overlap_factor_width,
            spatial_compression=self.config.spatial_compression,
            pad_tiles=t.pad_tiles if pad_tiles is None else bool(pad_tiles),
            batch_tiles=t.batch_tiles if batch_tiles is None else bool(batch_tiles),
        )
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # torch's Module.eval()/train() return the module, and diffusers users chain them
    # (``vae = AutoencoderKLCogVideoX.from_pretrained(...).eval()``); NNX's return None, which
    # would leave ``vae`` None. Same NNX behaviour (this model has no train/eval differences), and
    # the model back.
    def eval(self, **attributes) -> "AutoencoderKLCogVideoX":
        super().eval(**attributes)
        return self

    def train(self, **attributes) -> "AutoencoderKLCogVideoX":
        super().train(**attributes)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' ``enable_gradient_checkpointing``: for fine-tuning, trade compute for memory.

        A gradient then keeps only what each frame batch starts from (its input and the conv
        caches carried into it) and each resnet's input, and recomputes the rest in the backward
        pass: the batch once more, and its resnets once again inside that (the 2b decoder's
        gradient: 56% more FLOPs). The forward values and the gradients are unchanged.
        Switching compiles anew (the flag is part of the model's static structure)."""
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """diffusers' ``is_gradient_checkpointing``: whether any block checkpoints."""
        return any(getattr(m, "gradient_checkpointing", False) for _, m in nnx.iter_modules(self))

    def _set_gradient_checkpointing(self, on: bool) -> None:
        for _, module in nnx.iter_modules(self):  # this model and its blocks
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = on

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # ------------------------------------------------------------------ dtype
    def to(self, dtype: Any = None, *, compute_dtype: Any = None) -> "AutoencoderKLCogVideoX":
        """diffusers' ``vae.to(dtype)``: cast every parameter to ``dtype`` and compute in it, in
        place; returns the model. ``compute_dtype`` picks the compute dtype separately (default:
        ``dtype``), as ``load(..., dtype=, compute_dtype=)`` does. GroupNorm statistics stay fp32.
        Changing the compute dtype compiles anew (it is part of the model's static structure)."""
        if dtype is None and compute_dtype is None:
            raise TypeError("to() needs a dtype (and/or compute_dtype=)")
        dtype = resolve_dtype(dtype, "dtype")
        compute_dtype = dtype if compute_dtype is None else resolve_dtype(compute_dtype, "compute_dtype")
        params = nnx.state(self, nnx.Param)
        # A finite float32 weight beyond float16's range (65504) would be Inf once cast, in the
        # stored parameters (dtype) or inside every kernel (compute_dtype): refused by name, as
        # load(dtype=) and save(dtype=) refuse it, before anything changes.
        for target in {t for t in (dtype, compute_dtype) if t is not None and t is not jnp.float32}:
            _refuse_overflow(params, target)
        if dtype is not None:
            nnx.update(self, jax.tree.map(lambda p: p.astype(dtype), params))
        for _, module in nnx.iter_modules(self):  # every layer reads its compute dtype at call time
            if hasattr(module, "dtype"):
                module.dtype = compute_dtype
        return self

    # ------------------------------------------------------------------ latent scaling
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def scale_latents(self, z: Array, *, image_latents: bool = False) -> Array:
        """Encoder latents -> diffusion-model latents: ``z * scaling_factor``.

        For CogVideoX 1.5 image-conditioning latents (``invert_scale_latents``), diffusers' I2V
        pipeline divides instead, matching how that model was trained.
        """
        sf = self.config.scaling_factor
        if image_latents and self.config.invert_scale_latents:
            return (1 / sf) * z
        return sf * z

    def unscale_latents(self, z: Array) -> Array:
        """Diffusion-model latents -> decoder input: ``1 / scaling_factor * z`` (as the pipelines do)."""
        return (1 / self.config.scaling_factor) * z

    # ------------------------------------------------------------------ encode
    def _check_encodable(self, height: int, width: int, what: str = "video") -> None:
        """diffusers' Downsample3D pads a side of n pixels to n + 1 and runs a 3x3 conv of stride 2,
        which torch refuses for n < 2 ("Kernel size can't be greater than actual input size"); so
        does this model, instead of returning an empty latent. A config whose encoder cannot run
        at all (``config.encode_problem``) is refused here too, before any work."""
        problem = self.config.encode_problem
        if problem:
            raise ValueError(problem)
        for name, n in (("height", height), ("width", width)):
            size = n
            for _ in range(len(self.config.block_out_channels) - 1):
                if size < 2:
                    raise ValueError(
                        f"{what} {name} {n} is too small for the encoder: each of its "
                        f"{len(self.config.block_out_channels) - 1} downsamplings needs at least 2 pixels "
                        f"(it halves them), so the smallest {name} is {2 ** (len(self.config.block_out_channels) - 1)}")
                size //= 2

    def _encode(self, x: Array, compiled: bool) -> Array:
        t = self.tiling
        if self.use_tiling and (x.shape[3] > t.tile_sample_min_width or x.shape[2] > t.tile_sample_min_height):
            return self.tiled_encode(x, compiled=compiled)
        return self._encode_frames(x, compiled)

    def _run_batches(self, kind: str, x: Array, batch: int, compiled: bool, valid) -> Array:
        """diffusers' frame-batch loop: ``max(T // batch, 1)`` batches, the remainder in the first,
        conv caches carried from batch to batch; outputs concatenated in time."""
        with explicit_axes_hint(kind, x):  # an input split over explicit mesh axes: say how to build the mesh
            return self._run_batches_in(kind, x, batch, compiled, valid)

    def _run_batches_in(self, kind: str, x: Array, batch: int, compiled: bool, valid) -> Array:
        batches = frame_batches(x.shape[1], batch)
        if not compiled:
            step = _batch_step(self, kind)
            cache, outs = None, []
            for s, e in batches:
                out, cache = step(x[:, s:e], cache, valid)
                outs.append(out)
            return jnp.concatenate(outs, axis=1)
        graphdef, state = kernel_split(self, kind)
        k = kernels(nested=traced(x, state, valid))
        s0, e0 = batches[0]
        # The conv lowering and its tail read: a static argument of both kernels.
        impl = lowering(partitioned=_partitioned(x))
        out0, cache = k["first"](kind, impl, graphdef, state, x[:, s0:e0], valid)
        if len(batches) == 1:
            return out0
        outs, _ = k["scan"](kind, impl, graphdef, state, _stack_batches(x, e0, batch), cache, valid)
        return jnp.concatenate([out0, _unstack_batches(outs)], axis=1)

    def _encode_frames(self, x: Array, compiled: bool, valid=None) -> Array:
        """x: (B, T, H, W, C) -> h: (B, t, h, w, 2*latent), in diffusers' frame batches."""
        if valid is None:  # (a padded tile is checked at its valid size by _tiled)
            self._check_encodable(x.shape[2], x.shape[3])
        return self._run_batches("encode", x, self.num_sample_frames_batch_size, compiled, valid)

    def encode_moments(self, x: Array, *, compiled: bool = True) -> Array:
        """x: (B, T, H, W, C) -> raw encoder output (B, t, h, w, 2*latent): mean and logvar stacked."""
        x = _check_input(x, self.config.in_channels, "encode", "video", "(B, T, H, W, C)")
        if self.use_slicing and x.shape[0] > 1:
            return jnp.concatenate([self._encode(x[i : i + 1], compiled) for i in range(x.shape[0])], axis=0)
        return self._encode(x, compiled)

    def encode(self, x: Array, return_dict: bool = True, *, compiled: bool = True):
        """x: (B, T, H, W, C) in [-1, 1] -> the posterior: a ``DiagonalGaussianDistribution``,
        which is the tuple ``(mean, logvar)``, each (B, t, h, w, latent), with diffusers' methods.

        logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        ``return_dict=False`` gives ``(posterior,)``, as diffusers does; with the default the
        posterior is also its own ``.latent_dist``, so ``vae.encode(x).latent_dist`` reads as there.
        """
        h = self.encode_moments(x, compiled=compiled)
        mean, logvar = jnp.split(h, 2, axis=-1)
        posterior = DiagonalGaussianDistribution(mean, jnp.clip(logvar, -30.0, 20.0))
        return posterior if return_dict else (posterior,)

    # ------------------------------------------------------------------ decode
    def _decode(self, z: Array, compiled: bool) -> Array:
        t = self.tiling
        if self.use_tiling and (
            z.shape[3] > t.tile_latent_min_width or z.shape[2] > t.tile_latent_min_height
        ):
            return self.tiled_decode(z, compiled=compiled)
        return self._decode_frames(z, compiled)

    def _decode_frames(self, z: Array, compiled: bool, valid=None) -> Array:
        """z: (B, t, h, w, latent) -> (B, T, H, W, out), in diffusers' latent batches."""
        return self._run_batches("decode", z, self.num_latent_frames_batch_size, compiled, valid)

    def decode(self, z: Array, return_dict: Optional[bool] = None, *, compiled: bool = True):
        """z: (B, t, h, w, latent) -> video (B, T, H, W, out_channels).

        13 latent frames give 49 video frames, 1 gives 1 (an image), as in diffusers.
        Returns the array; ``return_dict=True`` gives diffusers' ``DecoderOutput`` (``.sample``),
        ``return_dict=False`` diffusers' ``(video,)``.
        """
        z = _check_input(z, self.config.latent_channels, "decode", "latent", "(B, t, h, w, C)")
        if self.use_slicing and z.shape[0] > 1:
            video = jnp.concatenate([self._decode(z[i : i + 1], compiled) for i in range(z.shape[0])], axis=0)
        else:
            video = self._decode(z, compiled)
        return _decoder_output(video, return_dict)

    def __call__(
        self,
        x: Array,
        sample_posterior: bool = False,
        return_dict: Optional[bool] = None,
        generator: Optional[jax.Array] = None,
        *,
        rng: Optional[jax.Array] = None,
        compiled: bool = True,
    ):
        """diffusers' ``forward``: x (B, T, H, W, C) -> reconstruction (B, T', H, W, C): encode, take
        the posterior's mode (or, with ``sample_posterior``, a sample drawn with the jax.random key
        ``generator``, also accepted as ``rng``), decode. ``return_dict`` as in ``decode``.

        The positional order is diffusers' ``forward(sample, sample_posterior, return_dict,
        generator)``, so ported code such as ``vae(x, False, False)[0]`` means what it meant there."""
        posterior = self.encode(x, compiled=compiled)
        if sample_posterior:
            z = posterior.sample(_key(rng, generator, "sample_posterior=True"))
        else:
            z = posterior.mode()
        return _decoder_output(self.decode(z, compiled=compiled), return_dict)

    # ------------------------------------------------------------------ tiling
    @staticmethod
    def _blend(a: Array, b: Array, extent: int, axis: int) -> Array:
        """diffusers blend_v (axis 2 = H) / blend_h (axis 3 = W): ramp a's tail into b's head."""
        extent = min(a.shape[axis], b.shape[axis], extent)
        if extent <= 0:
            return b
        # diffusers multiplies by Python floats (1 - y/e) and (y/e); computed in double, applied in fp32.
        w = np.arange(extent, dtype=np.float64) / extent
        shape = [1] * b.ndim
        shape[axis] = extent
        w_b = jnp.asarray(w.astype(np.float32).reshape(shape))
        w_a = jnp.asarray((1 - w).astype(np.float32).reshape(shape))
        a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
        b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
        # in fp32, explicitly (also under jax_numpy_dtype_promotion="strict"), rounded once to b's dtype
        mixed = (a_tail.astype(jnp.float32) * w_a + b_head.astype(jnp.float32) * w_b).astype(b.dtype)
        return jax.lax.dynamic_update_slice_in_dim(b, mixed, 0, axis=axis)

    def _tiled(self, x: Array, tile_in: tuple[int, int], tile_out: tuple[int, int], factors, run_tile, out_size,
               check=None) -> Array:
        """diffusers' tiled_encode / tiled_decode loop over (B, T, H, W, C) input tiles.

        With ``pad_tiles`` every tile is zero-padded to one shape and run with its valid size
        (see ``layers.mask_valid``), so all tiles share one compiled function; the output is
        cropped to the size diffusers' unpadded tile has (``out_size``). Without it, each tile
        runs unpadded, exactly as diffusers slices it.
        """
        fh, fw = factors
        height, width = x.shape[2], x.shape[3]
        full = (min(tile_in[0], height), min(tile_in[1], width))
        overlap_h = int(tile_in[0] * (1 - fh))
        overlap_w = int(tile_in[1] * (1 - fw))
        for name, size, f, step in (("height", tile_in[0], fh, overlap_h), ("width", tile_in[1], fw, overlap_w)):
            if step < 1:  # diffusers' range(0, n, 0) raises "arg 3 must not be zero", or a tile is empty
                raise ValueError(f"tiling: a tile {name} of {size} with overlap factor {f} moves the next tile by "
                                 f"{step}: use a larger tile or a smaller overlap factor (vae.tiling: {self.tiling})")
        blend_h = int(tile_out[0] * fh)
        blend_w = int(tile_out[1] * fw)
        limit_h = tile_out[0] - blend_h
        limit_w = tile_out[1] - blend_w
        # diffusers' tiles, row by row; every tile is checked before any is run
        tiles = [[x[:, :, i : i + tile_in[0], j : j + tile_in[1]] for j in range(0, width, overlap_w)]
                 for i in range(0, height, overlap_h)]
        if check is not None:
            for r, row in enumerate(tiles):
                for c, tile in enumerate(row):
                    check(tile.shape[2], tile.shape[3], f"tile at row {r * overlap_h}, column {c * overlap_w}:")
        if self.tiling.pad_tiles:
            rows = []
            for row in tiles:
                outs = []
                for tile in row:
                    vh, vw = tile.shape[2], tile.shape[3]
                    pad = ((0, 0), (0, 0), (0, full[0] - vh), (0, full[1] - vw), (0, 0))
                    out = run_tile(jnp.pad(tile, pad), (jnp.int32(vh), jnp.int32(vw)))
                    outs.append(out[:, :, : out_size(vh), : out_size(vw)])
                rows.append(outs)
        else:
            rows = self._run_exact_tiles(tiles, full, run_tile)
        # Blend in diffusers' order: each tile is blended (in place there) with its already-blended
        # upper and left neighbours, then cropped.
        result_rows = []
        for i, row in enumerate(rows):
            result_row = []
            for j in range(len(row)):
                tile = row[j]
                if i > 0:
                    tile = self._blend(rows[i - 1][j], tile, blend_h, axis=2)
                if j > 0:
                    tile = self._blend(row[j - 1], tile, blend_w, axis=3)
                row[j] = tile
                result_row.append(tile[:, :, :limit_h, :limit_w])
            result_rows.append(jnp.concatenate(result_row, axis=3))
        return jnp.concatenate(result_rows, axis=2)

    def _run_exact_tiles(self, tiles: list, full: tuple[int, int], run_tile) -> list:
        """Run unpadded tiles (``pad_tiles=False``), each at its own size; returns their outputs in
        the same rows and columns.

        With ``batch_tiles``, tiles of one shape run together, stacked along the batch axis, as
        many at a time as fit in the pixels of one full tile (``full``): at 2b scale the two
        30x18 and the two 10x45 latent edge tiles run as two calls of batch 2 instead of four
        calls, so that small tiles keep an accelerator busy while no call holds more activations
        than a full tile's. A stack's size divides its group's count, so every call of a shape
        has the same batch: still one compile per distinct tile shape. The batch axis is
        independent in every layer (GroupNorm normalises each sample alone), so each tile's
        result is what it is alone.
        """
        groups: dict = {}
        for r, row in enumerate(tiles):
            for c, tile in enumerate(row):
                groups.setdefault(tile.shape[2:4], []).append((r, c))
        outs: dict = {}
        for (vh, vw), members in groups.items():
            fit = max(1, (full[0] * full[1]) // (vh * vw)) if self.tiling.batch_tiles else 1
            size = max(d for d in range(1, min(fit, len(members)) + 1) if len(members) % d == 0)
            for k in range(0, len(members), size):
                stack = members[k : k + size]
                parts = [tiles[r][c] for r, c in stack]
                out = run_tile(parts[0] if size == 1 else jnp.concatenate(parts, axis=0), None)
                outs.update(zip(stack, jnp.split(out, size, axis=0) if size > 1 else [out]))
        return [[outs[(r, c)] for c in range(len(row))] for r, row in enumerate(tiles)]

    def _encoded_size(self, n: int) -> int:
        """Rows (or columns) the encoder makes of n: each Downsample3D maps n to n // 2."""
        for _ in range(len(self.config.block_out_channels) - 1):
            n //= 2
        return n

    def tiled_encode(self, x: Array, *, compiled: bool = True) -> Array:
        """x: (B, T, H, W, C) -> raw moments (B, t, h, w, 2*latent), tile by tile."""
        x = _check_input(x, self.config.in_channels, "tiled_encode", "video", "(B, T, H, W, C)")
        t = self.tiling
        return self._tiled(
            x,
            (t.tile_sample_min_height, t.tile_sample_min_width),
            (t.tile_latent_min_height, t.tile_latent_min_width),
            (t.tile_overlap_factor_height, t.tile_overlap_factor_width),
            lambda tile, valid: self._encode_frames(tile, compiled, valid),
            self._encoded_size,
            check=self._check_encodable,
        )

    def tiled_decode(self, z: Array, return_dict: Optional[bool] = None, *, compiled: bool = True):
        """z: (B, t, h, w, latent) -> video (B, T, H, W, out), tile by tile; ``return_dict`` as in ``decode``."""
        z = _check_input(z, self.config.latent_channels, "tiled_decode", "latent", "(B, t, h, w, C)")
        t = self.tiling
        video = self._tiled(
            z,
            (t.tile_latent_min_height, t.tile_latent_min_width),
            (t.tile_sample_min_height, t.tile_sample_min_width),
            (t.tile_overlap_factor_height, t.tile_overlap_factor_width),
            lambda tile, valid: self._decode_frames(tile, compiled, valid),
            lambda n: n * self.config.spatial_compression,
        )
        return _decoder_output(video, return_dict)
