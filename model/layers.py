"""Building blocks of the CogVideoX VAE in Flax NNX.

Layout: every video tensor is ``(B, T, H, W, C)`` (batch, frames, height, width, channels). Conv
kernels are ``(T, H, W, I, O)`` for 3-D convs and ``(H, W, I, O)`` for 2-D convs.

Each module mirrors one diffusers module of ``autoencoder_kl_cogvideox.py`` (and
``CogVideoXDownsample3D`` / ``CogVideoXUpsample3D``) with the same attribute names, so parameter
paths read like diffusers' state-dict keys. Modules that hold causal convs take and return a
*conv cache*: a dict that mirrors diffusers' ``conv_cache`` and carries the last ``kernel_t - 1``
padded input frames of every causal conv from one frame batch to the next.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Cache = Optional[dict]

__all__ = [
    "Conv3d",
    "Conv2d",
    "GroupNorm",
    "CausalConv3d",
    "SpatialNorm3D",
    "ResnetBlock3D",
    "Downsample3D",
    "Upsample3D",
    "DownBlock3D",
    "MidBlock3D",
    "UpBlock3D",
    "nearest_resize",
    "mask_valid",
]


def _precision(dtype) -> jax.lax.Precision:
    # fp32 must stay fp32 on accelerators (no TF32 passes), or parity with diffusers is lost.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _uniform(key, shape, dtype, bound):
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def per_channel(v: Array, ndim: int) -> Array:
    """A (C,) parameter shaped (1, ..., 1, C) for an ndim-D channels-last activation: broadcast at
    equal rank, so the model also runs under ``jax_numpy_rank_promotion="raise"`` (same values)."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def _conv_params(rngs: nnx.Rngs, kernel_shape: tuple[int, ...], param_dtype) -> tuple[nnx.Param, nnx.Param]:
    """Kernel (..., I, O) and bias with torch's default conv init range, 1/sqrt(fan_in)."""
    bound = 1.0 / np.sqrt(int(np.prod(kernel_shape[:-1])))
    kernel = nnx.Param(_uniform(rngs.params(), kernel_shape, param_dtype, bound))
    bias = nnx.Param(_uniform(rngs.params(), (kernel_shape[-1],), param_dtype, bound))
    return kernel, bias


# How a stride-1 3x3x3 conv is lowered. "3d": one 3-D convolution. "2d_sum": three 2-D convs,
# one per kernel frame, summed. "2d_concat": the three shifted frame stacks concatenated along
# channels and one 2-D conv with 3x the input channels (im2col over time); "2d_concat_chunked"
# does that over chunks of output frames to bound the stacked copy. All compute the same
# sum; which is fastest depends on the backend (see bench/RESULTS.md). "auto" picks per backend;
# the environment variable COGVAE_CONV_IMPL overrides it.
CONV3D_IMPLS = ("3d", "2d_sum", "2d_concat", "2d_concat_chunked")
# The stacked copy's budget: at 512 MiB a 256-channel 480x720 conv stacks one frame at a time (two
# at 1 GiB). XLA's compile-time memory of the 2b decode for an H200 (bf16, deviceless compile):
# first batch 7.26 -> 6.40 GiB, scan 6.99 -> 6.83 GiB; 256 MiB saves nothing more.
CHUNK_BYTES = 1 << 29
_AUTO_IMPL = {"cpu": "2d_sum", "gpu": "2d_concat_chunked", "tpu": "3d"}

# When each lowering reads a causal conv's next cache (its input's last frames; see conv3d and
# _after): "conv", after the conv's output; "chunks", after the stacked chunks that read the
# previous cache (2d_concat lowerings only); "slice", a plain slice XLA may schedule anywhere;
# "barrier", a plain slice passed with the conv's output through one optimization barrier, so both
# exist before anything reads the output (and the input can be freed right after the conv).
# The values compute the same; they differ in the buffers XLA keeps in the decode scan. Chosen by
# XLA's compile-time memory of the 2b decode scan (bench/bench_memory.py, bench/RESULTS.md). The
# compiled kernels are keyed on it (``lowering()``), so a changed entry compiles anew.
TAIL_READ = {"3d": "conv", "2d_sum": "conv", "2d_concat": "slice", "2d_concat_chunked": "slice"}
TAIL_READS = ("conv", "chunks", "slice", "barrier")
# Per-backend entries that take precedence over TAIL_READ. On a TPU the compiler schedules a plain
# or data-dependent slice late (an async slice done at the end of the kernel), so every conv input
# of the batch stays alive until then: XLA's compile-time plan of the 2b decode (bf16, 13x60x90
# latents) for one TPU v5e chip (15.75 GiB usable) needs 20.35 GiB of temporaries for the first
# batch with either read, and 12.37 GiB (15.23 GiB in all) with "barrier", which the TPU therefore
# also uses in the first batch (bench/bench_memory.py --target v5e; bench/RESULTS.md).
BACKEND_TAIL_READ = {"tpu": {"3d": "barrier"}}


_SCOPED_IMPL: list[tuple[str, Optional[str]]] = []


@contextlib.contextmanager
def conv_impl_scope(impl):
    """Trace under a fixed lowering: a conv impl name, or a ``lowering()`` key (impl, tail read),
    which the compiled kernels take as a static argument."""
    _SCOPED_IMPL.append((impl, None) if isinstance(impl, str) else tuple(impl))
    try:
        yield
    finally:
        _SCOPED_IMPL.pop()


def tail_read(impl: str, backend: Optional[str] = None) -> str:
    """When ``impl`` reads a causal conv's next cache: the scope's pinned choice, else
    ``backend``'s entry in BACKEND_TAIL_READ (``backend`` defaults to ``jax.default_backend()``),
    else TAIL_READ's."""
    if _SCOPED_IMPL and _SCOPED_IMPL[-1][0] == impl and _SCOPED_IMPL[-1][1] is not None:
        return _SCOPED_IMPL[-1][1]
    return BACKEND_TAIL_READ.get(backend or jax.default_backend(), {}).get(impl) or TAIL_READ[impl]


def lowering(impl: Optional[str] = None, *, partitioned: bool = False, backend: Optional[str] = None) -> tuple[str, str]:
    """The static key the compiled kernels are specialised on: (conv impl, its tail read).

    ``partitioned``: the input is split over several devices (see ``model/sharding.py``), and
    GSPMD partitions the kernels. There every new cache is read as a plain slice: the reads that
    wait for a value of the conv ("conv", "chunks") double the per-device temporaries of a
    partitioned step (2b decode step, fp32, height split over 2 CPU devices: 16.98 GiB with
    "conv" against 7.84 GiB with "slice", 13.94 GiB unsplit), while "slice" divides them by the
    number of devices.
    """
    impl = impl or conv3d_impl(backend)
    return impl, "slice" if partitioned else tail_read(impl, backend)


def conv3d_impl(backend: Optional[str] = None) -> str:
    """The conv lowering in force: the scope's, else COGVAE_CONV_IMPL, else ``backend``'s default
    (``backend`` defaults to ``jax.default_backend()``)."""
    if _SCOPED_IMPL:
        return _SCOPED_IMPL[-1][0]
    impl = os.environ.get("COGVAE_CONV_IMPL", "auto")
    if impl == "auto":
        return _AUTO_IMPL.get(backend or jax.default_backend(), "3d")
    if impl not in CONV3D_IMPLS:
        raise ValueError(f"COGVAE_CONV_IMPL={impl!r}: use one of {CONV3D_IMPLS} or 'auto'")
    return impl


def _conv2d_frames(x: Array, kernel: Array, padding, stride=(1, 1), precision=None) -> Array:
    """2-D conv of every frame: x (B, T, H, W, C), kernel (kh, kw, C, O) -> (B, T, H', W', O)."""
    b, t, h, w, c = x.shape
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t, h, w, c),
        kernel,
        window_strides=stride,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )
    return y.reshape(b, t, *y.shape[1:])


def _after(y, frames: Array, start: int, size: int) -> Array:
    """``frames[:, start:start + size]``, read only once ``y`` (an array, or a list of them) is computed.

    The index depends on one element of y (``start + isnan(y[0, ...])``); dynamic_slice clamps it
    to ``start`` (the slice ends at the last frame), so the value is always the static slice. The
    data dependence is what matters: XLA fuses a static slice into the producers of ``frames`` and
    may compute it before the conv, while the previous batch's cache (which the conv input
    contains) is still to be read; the scan then keeps the new cache apart from the loop's carry
    buffer, or copies the old one out. Read after the conv, the new cache can overwrite the old in
    place. (The clamp needs ``start + size == frames.shape[1]``.)
    """
    assert start + size == frames.shape[1]
    ys = y if isinstance(y, list) else [y]
    probe = sum(jnp.isnan(v[(0,) * v.ndim]).astype(jnp.int32) for v in ys)
    return jax.lax.dynamic_slice_in_dim(frames, start + probe, size, axis=1)


def conv3d(x: Array, kernel: Array, padding, precision, impl: str, tail: int = 0):
    """Stride-1 3-D conv, x (B, T, H, W, C), kernel (kt, kh, kw, C, O), no padding in time.

    With ``tail`` (0 < tail < kt) also returns x's last ``tail`` frames: the causal conv's next
    cache, read as ``TAIL_READ`` says. The ``3d`` and ``2d_sum`` lowerings read them after the conv
    (see ``_after``), which cuts XLA's compile-time total of the 2b decode scan (fp32, CPU) from
    17.2 to 14.5 GiB (``3d``) and from 23.8 to 19.8 GiB (``2d_sum``).
    """
    kt = kernel.shape[0]
    hw_pad = padding[1:]
    if kt == 1:  # a 1-frame kernel is a 2-D conv of every frame
        assert not tail
        return _conv2d_frames(x, kernel[0], hw_pad, precision=precision)
    read = tail_read(impl)
    if read not in TAIL_READS or (read == "chunks" and not impl.startswith("2d_concat")):
        raise ValueError(f"TAIL_READ[{impl!r}] = {read!r}: use one of {TAIL_READS} ('chunks': 2d_concat lowerings)")

    def with_tail(y, readers=()):
        if not tail:
            return y
        start = x.shape[1] - tail
        if read in ("slice", "barrier"):  # "barrier": Conv3d adds the bias, then the barrier
            return y, x[:, start:]
        return y, _after(list(readers) if read == "chunks" else y, x, start, tail)

    if impl == "3d":
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1, 1), padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=precision
        )
        return with_tail(y)
    t = x.shape[1] - kt + 1
    if impl == "2d_sum":
        out = _conv2d_frames(x[:, 0:t], kernel[0], hw_pad, precision=precision)
        for dt in range(1, kt):
            out = out + _conv2d_frames(x[:, dt : dt + t], kernel[dt], hw_pad, precision=precision)
        return with_tail(out)
    if impl in ("2d_concat", "2d_concat_chunked"):
        kh, kw, c, o = kernel.shape[1:]
        k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, o)
        step = t
        if impl == "2d_concat_chunked":
            # Bound the stacked copy (kt x the input) to about CHUNK_BYTES: output frames in chunks.
            per_frame = kt * c * x.shape[0] * x.shape[2] * x.shape[3] * x.dtype.itemsize
            step = max(1, min(t, CHUNK_BYTES // per_frame))
        outs, readers = [], []
        for s0 in range(0, t, step):
            n = min(step, t - s0)
            stacked = jnp.concatenate([x[:, s0 + dt : s0 + dt + n] for dt in range(kt)], axis=-1)
            if s0 < tail:  # this chunk holds x's first `tail` frames: the previous batch's cache
                readers.append(stacked)
            outs.append(_conv2d_frames(stacked, k2, hw_pad, precision=precision))
        y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
        # "slice" here: on the CPU, "conv" raised the 2b decode scan's compile-time total from 17.2
        # to 22.1 GiB (fp32); "chunks" gave 18.2 (fp32) and 14.0 against 16.0 GiB (bf16) at 2b
        # but 51.0 against 48.0 GiB (bf16) at 1.5 scale: no clear winner without a GPU figure.
        return with_tail(y, readers)
    raise ValueError(f"unknown conv impl {impl!r}")


def mask_valid(x: Array, valid) -> Array:
    """Zero x (B, T, H, W, C) outside its top-left ``valid = (h, w)`` region; identity for None.

    Tiled encode/decode pads every edge tile to the full tile size so that one compiled function
    serves all tiles. Zeroing the padding before each spatial conv makes the conv see exactly the
    zero border diffusers' smaller edge tile sees, and GroupNorm takes statistics over the valid
    region only, so a padded tile computes what diffusers computes on the unpadded one.
    """
    if valid is None:
        return x
    rows = jnp.arange(x.shape[2])[:, None] < valid[0]
    cols = jnp.arange(x.shape[3])[None, :] < valid[1]
    return jnp.where((rows & cols)[None, None, :, :, None], x, jnp.zeros((), x.dtype))


def halve_valid(valid):
    """Valid size after a Downsample3D: (pad 1, 3x3 stride-2 conv) maps n rows to n // 2."""
    return None if valid is None else (valid[0] // 2, valid[1] // 2)


def double_valid(valid):
    """Valid size after an Upsample3D (nearest x2)."""
    return None if valid is None else (valid[0] * 2, valid[1] * 2)


class Conv3d(nnx.Module):
    """A plain stride-1 3-D conv (torch ``nn.Conv3d`` semantics, zero padding in H and W only).

    x: (B, T, H, W, Cin) -> (B, T - kt + 1, H', W', Cout).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int],
        *,
        padding: tuple[int, int, int] = (0, 0, 0),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if padding[0]:
            raise ValueError("Conv3d pads time causally outside the conv (see CausalConv3d)")
        self.kernel, self.bias = _conv_params(rngs, (*kernel_size, in_channels, out_channels), param_dtype)
        self.padding = tuple((p, p) for p in padding)
        self.dtype = dtype

    def __call__(self, x: Array, tail: int = 0):
        """x: (B, T, H, W, Cin) -> (B, T', H', W', Cout); with ``tail`` > 0, also x's last ``tail``
        frames (B, tail, H, W, Cin), read when ``TAIL_READ`` says (see ``conv3d``)."""
        impl = conv3d_impl()
        out = conv3d(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            self.padding,
            _precision(self.dtype),
            impl,
            tail=tail,
        )
        bias = per_channel(self.bias[...].astype(self.dtype), x.ndim)  # the output's rank is x's
        if not tail:
            return out + bias
        y, new_cache = out[0] + bias, out[1]
        if tail_read(impl) == "barrier":  # after the bias, which then fuses into the conv
            y, new_cache = jax.lax.optimization_barrier((y, new_cache))
        return y, new_cache


class Conv2d(nnx.Module):
    """A 2-D conv applied to every frame (diffusers folds T into the batch for its Conv2d)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int = 0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel, self.bias = _conv_params(
            rngs, (kernel_size, kernel_size, in_channels, out_channels), param_dtype
        )
        self.stride = (stride, stride)
        self.padding = ((padding, padding), (padding, padding))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """x: (B, T, H, W, Cin) -> (B, T, H', W', Cout)."""
        y = _conv2d_frames(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            self.padding,
            stride=self.stride,
            precision=_precision(self.dtype),
        )
        return y + per_channel(self.bias[...].astype(self.dtype), y.ndim)


class GroupNorm(nnx.Module):
    """torch ``nn.GroupNorm`` over (T, H, W, C/G) per sample and group.

    Statistics are computed in fp32 with a two-pass variance, as torch does, whatever the
    compute dtype (Flax's default ``E[x^2] - E[x]^2`` differs measurably in fp32).
    Statistics cover exactly the frames passed in: diffusers normalises each frame batch on its own.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-6,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        del rngs
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: Array, valid=None) -> Array:
        """x: (B, T, H, W, C) -> same shape, compute dtype. ``valid``: see ``mask_valid``."""
        b, t, h, w, c = x.shape
        g = self.num_groups
        xf = x.astype(jnp.float32)
        # Each statistic is summed per channel over (T, H, W) first and then over the channels of a
        # group. Summed over (T, H, W, C/G) at once, XLA's GPU compiler splits the reduction and
        # materialises an fp32 (T*H*W, G) partial sum, a quarter of a bf16 activation; per-channel
        # sums are plain column reductions with no such intermediate. Same statistics, fp32 rounding.
        if valid is None:
            m, count = None, float(t * h * w * (c // g))
        else:
            m = mask_valid(jnp.ones((1, 1, h, w, 1), jnp.float32), valid)
            count = (t * (c // g)) * (valid[0] * valid[1]).astype(jnp.float32)

        def group_mean(v):  # v: (B, T, H, W, C) -> (B, 1, 1, 1, C), each channel its group's mean
            per_channel = jnp.sum(v if m is None else v * m, axis=(1, 2, 3))  # (B, C)
            per_group = jnp.sum(per_channel.reshape(b, g, c // g), axis=-1, keepdims=True) / count
            return jnp.broadcast_to(per_group, (b, g, c // g)).reshape(b, 1, 1, 1, c)

        centred = xf - group_mean(xf)
        var = group_mean(jnp.square(centred))
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = y * per_channel(self.scale[...].astype(jnp.float32), y.ndim) \
            + per_channel(self.bias[...].astype(jnp.float32), y.ndim)
        return y.astype(self.dtype)


class CausalConv3d(nnx.Module):
    """diffusers ``CogVideoXCausalConv3d`` (pad_mode "first").

    Time is padded on the left only (causal) by ``kernel_t - 1`` frames: on the first frame batch
    those are copies of the first frame, afterwards they are the cached tail of the previous
    batch's padded input (``conv_cache``). Height and width are zero-padded symmetrically by
    ``(k - 1) // 2`` inside the conv, as diffusers' ``const_padding_conv3d`` does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        k = kernel_size
        self.time_kernel_size = k
        self.conv = Conv3d(
            in_channels,
            out_channels,
            (k, k, k),
            padding=(0, (k - 1) // 2, (k - 1) // 2),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, cache: Optional[Array] = None, valid=None) -> tuple[Array, Optional[Array]]:
        """x: (B, T, H, W, Cin); cache: (B, kernel_t - 1, H, W, Cin) or None.

        Returns the output (B, T, H, W, Cout) and the new cache (None for kernel_t == 1, whose
        cache diffusers keeps but never reads).
        """
        k = self.time_kernel_size
        if k == 1:
            return self.conv(x), None
        x = mask_valid(x.astype(self.conv.dtype), valid)
        pad = cache if cache is not None else jnp.repeat(x[:, :1], k - 1, axis=1)
        padded = jnp.concatenate([pad.astype(x.dtype), x], axis=1)
        # The new cache (the last k - 1 input frames) is read as conv3d's ``tail`` says. In the first
        # batch (no cache) only "barrier" needs that (a TPU's first batch is what it fixes); the
        # other reads keep the plain slice there, whose memory was measured on GPU and CPU.
        if x.shape[1] < k - 1 or (cache is None and tail_read(conv3d_impl()) != "barrier"):
            return self.conv(padded), padded[:, -(k - 1) :]
        return self.conv(padded, tail=k - 1)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's ``F.interpolate(mode="nearest", size=...)`` along one axis."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def nearest_resize(x: Array, size: tuple[int, int, int]) -> Array:
    """torch ``F.interpolate(x, size=size)`` (mode "nearest") on (B, T, H, W, C) over (T, H, W)."""
    for axis, out in zip((1, 2, 3), size):
        n = x.shape[axis]
        if n == out:
            continue
        idx = _nearest_indices(n, out)
        if out % n == 0 and np.array_equal(idx, np.arange(out) // (out // n)):
            x = jnp.repeat(x, out // n, axis=axis)  # same indices, cheaper than a gather
        else:
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


def _upsample_hw(x: Array) -> Array:
    """Nearest x2 in height and width: ``F.interpolate(scale_factor=2.0)`` on frames."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


class SpatialNorm3D(nnx.Module):
    """diffusers ``CogVideoXSpatialNorm3D``: GroupNorm(f) * conv_y(zq) + conv_b(zq).

    ``zq`` (the decoder's latent batch) is resized by nearest interpolation to ``f``'s size. When
    ``f`` has an odd frame count > 1, the first frame and the rest are resized separately, as
    diffusers does, so the first latent frame conditions exactly the first video frame.
    """

    def __init__(
        self, f_channels: int, zq_channels: int, *, groups: int = 32, dtype=jnp.float32, param_dtype=jnp.float32, rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # eps is fixed at 1e-6 in diffusers here, whatever the config's norm_eps.
        self.norm_layer = GroupNorm(groups, f_channels, eps=1e-6, **kw)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1, **kw)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1, **kw)

    def __call__(self, f: Array, zq: Array, cache: Cache = None, valid=None) -> tuple[Array, dict]:
        """f: (B, T, H, W, Cf); zq: (B, Tz, h, w, Cz) -> (B, T, H, W, Cf)."""
        del cache  # both convs have kernel 1: no temporal context is carried
        # diffusers resizes zq to f's size and then applies conv_y and conv_b. Both are 1x1x1 convs,
        # pointwise in time and space, so they commute with nearest resizing: every output pixel is
        # the same dot product of the same latent vector either way. Applying them at the latent
        # size and resizing the results computes the same values on up to 256x fewer pixels, and
        # the full-size y and b are never stored: the resize fuses into the product below. (Resized
        # first, XLA computes the full-size y and b of every SpatialNorm early and holds all 14 of
        # the largest ones at once.)
        y, _ = self.conv_y(zq)
        b, _ = self.conv_b(zq)
        y, b = _resize_zq(y, f.shape[1:4]), _resize_zq(b, f.shape[1:4])
        return self.norm_layer(f, valid) * y + b, {}


def _resize_zq(x: Array, size: tuple[int, int, int]) -> Array:
    """diffusers' zq resize in ``CogVideoXSpatialNorm3D``: nearest to (T, H, W); when T is odd and
    > 1 the first frame and the rest are resized separately, so that the first latent frame
    conditions exactly the first video frame."""
    t, h, w = size
    th, tw = x.shape[2:4]
    # Nearest resizing is separable: time first, at the latent's small size (where the odd-frame
    # concatenation is cheap), then height and width, whose repeats fuse into the consumer.
    if t > 1 and t % 2 == 1:
        first = nearest_resize(x[:, :1], (1, th, tw))
        rest = nearest_resize(x[:, 1:], (t - 1, th, tw))
        x = jnp.concatenate([first, rest], axis=1)
    else:
        x = nearest_resize(x, (t, th, tw))
    return nearest_resize(x, (t, h, w))


def _gelu(x: Array) -> Array:
    # torch.nn.GELU() defaults to the exact (erf) form; jax.nn.gelu to the tanh approximation
    return jax.nn.gelu(x, approximate=False)


# diffusers' get_activation (models/activations.py ACT2CLS): the names a config's act_fn may take,
# used by every resnet. The encoder's and decoder's conv_act before conv_out is SiLU whatever the
# config says (diffusers hard-codes nn.SiLU() there). Each maps 0 to 0, so masked padding stays 0.
ACTIVATIONS = {"swish": jax.nn.silu, "silu": jax.nn.silu, "mish": jax.nn.mish, "gelu": _gelu, "relu": jax.nn.relu}


class ResnetBlock3D(nnx.Module):
    """diffusers ``CogVideoXResnetBlock3D`` (temb_channels=0, dropout 0, no conv shortcut flag).

    Uses GroupNorm in the encoder and SpatialNorm3D (conditioned on the latents) in the decoder.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        eps: float,
        spatial_norm_dim: Optional[int] = None,
        act_fn: str = "silu",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if act_fn.lower() not in ACTIVATIONS:  # diffusers' get_activation lowercases the name
            raise ValueError(f"unsupported activation {act_fn!r} (one of {', '.join(ACTIVATIONS)})")
        self.act_fn = act_fn.lower()  # diffusers' non_linearity (the config's act_fn)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial = spatial_norm_dim is not None
        if spatial_norm_dim is None:
            self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
            self.norm2 = GroupNorm(groups, out_channels, eps=eps, **kw)
        else:
            self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups=groups, **kw)
            self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups=groups, **kw)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, **kw)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, **kw)
        if in_channels != out_channels:
            # diffusers: a CogVideoXSafeConv3d with kernel 1, i.e. a plain 1x1x1 Conv3d.
            self.conv_shortcut = Conv3d(in_channels, out_channels, (1, 1, 1), **kw)
        else:
            self.conv_shortcut = None

    def __call__(self, x: Array, zq: Optional[Array] = None, cache: Cache = None, valid=None) -> tuple[Array, dict]:
        """x: (B, T, H, W, Cin) -> (B, T, H, W, Cout)."""
        cache = cache or {}
        new = {}
        if self.spatial:
            h, new["norm1"] = self.norm1(x, zq, cache.get("norm1"), valid)
        else:
            h = self.norm1(x, valid)
        h = ACTIVATIONS[self.act_fn](h)
        h, new["conv1"] = self.conv1(h, cache.get("conv1"), valid)
        if self.spatial:
            h, new["norm2"] = self.norm2(h, zq, cache.get("norm2"), valid)
        else:
            h = self.norm2(h, valid)
        h = ACTIVATIONS[self.act_fn](h)
        h, new["conv2"] = self.conv2(h, cache.get("conv2"), valid)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x.astype(h.dtype), new


class Downsample3D(nnx.Module):
    """diffusers ``CogVideoXDownsample3D``.

    With ``compress_time``, frames are average-pooled in pairs; for an odd count the first frame is
    kept on its own (diffusers' odd-frame rule, so an image stays one frame). Then height and width
    are zero-padded by one on the bottom/right only (diffusers' ``F.pad(x, (0, 1, 0, 1))``) and a
    3x3 stride-2 conv runs on every frame.
    """

    def __init__(self, in_channels: int, out_channels: int, *, compress_time: bool, dtype, param_dtype, rngs):
        self.compress_time = compress_time
        self.conv = Conv2d(
            in_channels, out_channels, 3, stride=2, padding=0, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    @staticmethod
    def _pool_pairs(x: Array) -> Array:
        # F.avg_pool1d(kernel=2, stride=2): mean of frames (0,1), (2,3), ...; a trailing odd frame is dropped.
        n = x.shape[1] // 2
        x = x[:, : 2 * n]
        return (x[:, 0::2] + x[:, 1::2]) / 2

    def __call__(self, x: Array, valid=None) -> Array:
        """x: (B, T, H, W, C) -> (B, T', H // 2, W // 2, C')."""
        if self.compress_time:
            t = x.shape[1]
            if t % 2 == 1:
                first, rest = x[:, :1], x[:, 1:]
                if rest.shape[1] > 0:
                    rest = self._pool_pairs(rest)
                x = jnp.concatenate([first, rest.astype(first.dtype)], axis=1)
            else:
                x = self._pool_pairs(x)
        x = jnp.pad(mask_valid(x, valid), ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample3D(nnx.Module):
    """diffusers ``CogVideoXUpsample3D``: nearest x2 upsampling, then a 3x3 conv on every frame.

    With ``compress_time``: an odd frame count > 1 keeps the first frame single (space only) and
    doubles the rest in time and space; an even count doubles everything; a single frame is
    upsampled in space only, so one latent frame decodes to one video frame.
    """

    def __init__(self, in_channels: int, out_channels: int, *, compress_time: bool, dtype, param_dtype, rngs):
        self.compress_time = compress_time
        self.conv = Conv2d(
            in_channels, out_channels, 3, stride=1, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: Array, valid=None) -> Array:
        """x: (B, T, H, W, C) -> (B, T', 2H, 2W, C'); ``valid`` is the input's valid size."""
        t = x.shape[1]
        if self.compress_time and t > 1:
            # diffusers doubles time by nearest interpolation (every frame twice) and then convs
            # every frame. The conv works frame by frame, so it runs on the distinct frames and its
            # output is repeated: the same values for half the conv's work.
            if t % 2 == 1:
                first = self._upsample_conv(x[:, :1], valid)
                rest = jnp.repeat(self._upsample_conv(x[:, 1:], valid), 2, axis=1)
                return jnp.concatenate([first, rest], axis=1)
            return jnp.repeat(self._upsample_conv(x, valid), 2, axis=1)
        return self._upsample_conv(x, valid)

    def _upsample_conv(self, x: Array, valid) -> Array:
        """Nearest x2 in space, then the conv on every frame: (B, T, H, W, C) -> (B, T, 2H, 2W, C')."""
        return self.conv(mask_valid(_upsample_hw(x), double_valid(valid)))


def checkpointed(fn, module: nnx.Module, *args):
    """``fn(module, *args)``, with its activations recomputed in the backward pass instead of kept
    (``jax.checkpoint``): only its inputs are saved. Without a gradient it is a plain call."""
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


def _call(module, *args):
    return module(*args)


def _run_resnets(resnets, h, zq, cache, valid, checkpoint: bool = False):
    """The block's resnets in order; ``checkpoint``: each one checkpointed, as diffusers' blocks
    do under ``enable_gradient_checkpointing``."""
    cache = cache or {}
    new = {}
    for i, resnet in enumerate(resnets):
        key = f"resnet_{i}"
        if checkpoint:
            h, new[key] = checkpointed(_call, resnet, h, zq, cache.get(key), valid)
        else:
            h, new[key] = resnet(h, zq, cache.get(key), valid)
    return h, new


class DownBlock3D(nnx.Module):
    """diffusers ``CogVideoXDownBlock3D``: GroupNorm resnets, then an optional Downsample3D."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        eps: float,
        groups: int,
        add_downsample: bool,
        compress_time: bool,
        act_fn: str = "silu",
        dtype,
        param_dtype,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock3D(
                    in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps, act_fn=act_fn, **kw
                )
                for i in range(num_layers)
            ]
        )
        if add_downsample:
            self.downsamplers = nnx.List([Downsample3D(out_channels, out_channels, compress_time=compress_time, **kw)])
        else:
            self.downsamplers = None
        self.gradient_checkpointing = False  # diffusers' attribute (see AutoencoderKLCogVideoX)

    def __call__(self, x: Array, cache: Cache = None, valid=None) -> tuple[Array, dict]:
        h, new = _run_resnets(self.resnets, x, None, cache, valid, self.gradient_checkpointing)
        if self.downsamplers is not None:
            for d in self.downsamplers:
                h = d(h, valid)
                valid = halve_valid(valid)
        return h, new


class MidBlock3D(nnx.Module):
    """diffusers ``CogVideoXMidBlock3D``: resnets at constant width (SpatialNorm in the decoder)."""

    def __init__(
        self,
        channels: int,
        *,
        num_layers: int,
        eps: float,
        groups: int,
        spatial_norm_dim,
        act_fn: str = "silu",
        dtype,
        param_dtype,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock3D(
                    channels, channels, groups=groups, eps=eps, spatial_norm_dim=spatial_norm_dim, act_fn=act_fn, **kw
                )
                for _ in range(num_layers)
            ]
        )
        self.gradient_checkpointing = False

    def __call__(self, x: Array, zq: Optional[Array] = None, cache: Cache = None, valid=None) -> tuple[Array, dict]:
        return _run_resnets(self.resnets, x, zq, cache, valid, self.gradient_checkpointing)


class UpBlock3D(nnx.Module):
    """diffusers ``CogVideoXUpBlock3D``: SpatialNorm resnets, then an optional Upsample3D."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        eps: float,
        groups: int,
        spatial_norm_dim: int,
        add_upsample: bool,
        compress_time: bool,
        act_fn: str = "silu",
        dtype,
        param_dtype,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock3D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    groups=groups,
                    eps=eps,
                    spatial_norm_dim=spatial_norm_dim,
                    act_fn=act_fn,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        if add_upsample:
            self.upsamplers = nnx.List([Upsample3D(out_channels, out_channels, compress_time=compress_time, **kw)])
        else:
            self.upsamplers = None
        self.gradient_checkpointing = False

    def __call__(self, x: Array, zq: Array, cache: Cache = None, valid=None) -> tuple[Array, dict]:
        h, new = _run_resnets(self.resnets, x, zq, cache, valid, self.gradient_checkpointing)
        if self.upsamplers is not None:
            for u in self.upsamplers:
                h = u(h, valid)
                valid = double_valid(valid)
        return h, new
