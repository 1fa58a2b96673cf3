"""cogvae.model: a Flax NNX reimplementation of diffusers' ``AutoencoderKLCogVideoX``.

Layout is ``(B, T, H, W, C)`` throughout. Build with ``AutoencoderKLCogVideoX(config, rngs=...)`` or,
without allocating weights, ``abstract_model(config)``.
"""

from .config import HANDLED_KEYS, IGNORED_KEYS, PRESETS, ConfigError, VAEConfig
from .vae import (
    AutoencoderKLCogVideoX,
    Decoder3D,
    Encoder3D,
    TilingConfig,
    default_compute_dtype,
    frame_batches,
)


def abstract_model(config: VAEConfig, *, dtype=None, param_dtype=None):
    """The model with every parameter a ``jax.ShapeDtypeStruct``: no weights are allocated."""
    from flax import nnx
    import jax.numpy as jnp

    return nnx.eval_shape(
        lambda: AutoencoderKLCogVideoX(
            config, dtype=dtype, param_dtype=jnp.float32 if param_dtype is None else param_dtype, rngs=nnx.Rngs(0)
        )
    )


__all__ = [
    "AutoencoderKLCogVideoX",
    "ConfigError",
    "Decoder3D",
    "Encoder3D",
    "HANDLED_KEYS",
    "IGNORED_KEYS",
    "PRESETS",
    "TilingConfig",
    "VAEConfig",
    "abstract_model",
    "default_compute_dtype",
    "frame_batches",
]
