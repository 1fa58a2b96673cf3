"""Decode and encode across several devices: shard the video, replicate the weights.

Layout: videos and latents are ``(B, T, H, W, C)``. ``encode`` and ``decode`` are plain jitted
functions, so they follow the sharding of their input (GSPMD): with the batch axis split over a
mesh, each device decodes its own samples; with height (and/or width) split, every activation of
every layer is split the same way, XLA exchanging the one-row halo each 3x3 conv needs and
all-reducing GroupNorm's statistics. The frames still go through diffusers' frame batches and
conv caches in order: sharding divides each device's memory, not the sequence.

Results match diffusers within the parity tolerances (a split GroupNorm sum only adds in another
order), and each device holds about 1/n of the temporaries: ``tests/test_sharding.py`` checks
both on 4 CPU devices. A split input is compiled with its own kernels, which read each new conv
cache as a plain slice (``layers.lowering``): the ordered reads that save memory on one device
double it once partitioned.

The mesh's axes must be automatic (``AxisType.Auto``), which ``jax.make_mesh`` does not make by
default: on explicit axes an array carries its split in its type, and reshapes and pads must say
how the split goes through them, which GroupNorm's group statistics and the encoder's
downsampling pad do not (encode and decode then say so, see ``explicit_axes_hint``). On automatic
axes XLA's partitioner carries the split through, as for any jitted function.

    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Auto,))
    replicate(vae, mesh)                                      # the weights on every device, once
    z = jax.device_put(z, video_sharding(mesh, height="x"))  # (B, t, h, w, C), h split
    video = vae.decode(z)                                     # (B, T, H, W, 3), H split
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["replicate", "video_sharding", "explicit_axes_hint"]


def _split_over_explicit_axes(x) -> bool:
    """Whether ``x`` (an array or a tracer) is split over a mesh axis of the explicit kind."""
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 -- not a jax value (numpy), or a jax without sharding types
        return False
    mesh = getattr(sharding, "mesh", None)
    used = {n for p in getattr(sharding, "spec", ()) or () if p is not None for n in (p if isinstance(p, tuple) else (p,))}
    return any(t == AxisType.Explicit and name in used
               for name, t in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ()) or ()))


@contextlib.contextmanager
def explicit_axes_hint(what: str, x) -> Iterator[None]:
    """Around an encode or decode of ``x``: when ``x`` is split over explicit mesh axes
    (``jax.make_mesh``'s default), jax's failure on the first reshape or pad of a split dimension
    (a ShardingTypeError; an IndexError in jax 0.11's reshape rule) becomes a ValueError that says
    how to build the mesh. Any other input's errors pass through as they are."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- re-raised unless x is split over explicit axes
        if not _split_over_explicit_axes(x):
            raise
        raise ValueError(
            f"{what}: the input is split over mesh axes of the explicit kind, which cogvae's encode and decode do "
            "not support (a reshape or pad of a split dimension needs its split spelled out); build the mesh with "
            "automatic axes: jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)). "
            f"jax said: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def replicate(vae: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every array of ``vae`` (parameters and all) on every device of ``mesh``, in place.

    Without it the weights stay on one device and each sharded call copies them to the others
    again. Returns ``vae``.
    """
    state = nnx.state(vae)
    nnx.update(vae, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    return vae


def video_sharding(
    mesh: Mesh, *, batch: Optional[str] = None, height: Optional[str] = None, width: Optional[str] = None
) -> NamedSharding:
    """A sharding of a ``(B, T, H, W, C)`` video or latent over the named mesh axes.

    Time and channels are never split: diffusers' frame batches run in order and every conv
    mixes all channels. Each split size must divide by its mesh axis (``jax.device_put`` says
    which does not); a latent height of 60 splits over 2, 3, 4, 5 or 6 devices, not 8.
    """
    for what, n in (("batch", batch), ("height", height), ("width", width)):
        if n is not None and not isinstance(n, str):  # jax's P(("a", "b")) form: one dimension over two axes
            raise ValueError(f"video_sharding: {what}={n!r}: give one mesh axis name per dimension (splitting one "
                             "dimension over several mesh axes is not supported; a 2-D mesh can split height "
                             "and width, or batch and height, together)")
    names = [n for n in (batch, height, width) if n is not None]
    unknown = [n for n in names if n not in mesh.axis_names]
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not in the mesh's axes {mesh.axis_names}")
    if len(set(names)) != len(names):
        raise ValueError(f"a mesh axis may split one dimension only, got batch={batch} height={height} width={width}")
    return NamedSharding(mesh, PartitionSpec(batch, None, height, width, None))
