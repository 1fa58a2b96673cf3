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

    mesh = jax.make_mesh((jax.device_count(),), ("x",))  # explicit or automatic axes, either works
    replicate(vae, mesh)                                      # the weights on every device, once
    z = jax.device_put(z, video_sharding(mesh, height="x"))  # (B, t, h, w, C), h split
    video = vae.decode(z)                                     # (B, T, H, W, 3), H split
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["replicate", "video_sharding"]


def _automatic_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis automatic. ``jax.make_mesh`` makes explicit axes by default, whose
    arrays carry their split in their type: reshapes and pads must then say how the split goes
    through them, which GroupNorm's group statistics and the encoder's downsampling pad do not
    (a ShardingTypeError). On automatic axes XLA's partitioner propagates the split, as for any
    jitted function; same devices, same split, no data moved."""
    types = getattr(mesh, "axis_types", None)
    if types is None or all(t == AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def automatic(x: jax.Array) -> jax.Array:
    """``x`` as is, or, when it is split over a mesh with explicit axes, the same split over the
    automatic version of that mesh (see ``_automatic_mesh``): what ``encode`` and ``decode`` do
    with their input, so that an array placed with the user's own explicit mesh works too."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return x
    mesh = _automatic_mesh(sharding.mesh)
    if mesh is sharding.mesh:
        return x
    return jax.device_put(x, NamedSharding(mesh, sharding.spec))


def replicate(vae: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every array of ``vae`` (parameters and all) on every device of ``mesh``, in place.

    Without it the weights stay on one device and each sharded call copies them to the others
    again. Returns ``vae``.
    """
    state = nnx.state(vae)
    nnx.update(vae, jax.device_put(state, NamedSharding(_automatic_mesh(mesh), PartitionSpec())))
    return vae


def video_sharding(
    mesh: Mesh, *, batch: Optional[str] = None, height: Optional[str] = None, width: Optional[str] = None
) -> NamedSharding:
    """A sharding of a ``(B, T, H, W, C)`` video or latent over the named mesh axes.

    Time and channels are never split: diffusers' frame batches run in order and every conv
    mixes all channels. Each split size must divide by its mesh axis (``jax.device_put`` says
    which does not); a latent height of 60 splits over 2, 3, 4, 5 or 6 devices, not 8.
    """
    names = [n for n in (batch, height, width) if n is not None]
    unknown = [n for n in names if n not in mesh.axis_names]
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not in the mesh's axes {mesh.axis_names}")
    if len(set(names)) != len(names):
        raise ValueError(f"a mesh axis may split one dimension only, got batch={batch} height={height} width={width}")
    return NamedSharding(_automatic_mesh(mesh), PartitionSpec(batch, None, height, width, None))
