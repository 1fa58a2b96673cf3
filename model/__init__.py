"""cogvae.model: a Flax NNX reimplementation of diffusers' ``AutoencoderKLCogVideoX``.

Layout is ``(B, T, H, W, C)`` throughout. Build with ``AutoencoderKLCogVideoX(config, rngs=...)`` or,
without allocating weights, ``abstract_model(config)``.
"""

from .compilation_cache import default_cache_dir, enable_compilation_cache
from .config import HANDLED_KEYS, IGNORED_KEYS, PRESETS, ConfigError, VAEConfig
from .sharding import replicate, video_sharding
from .vae import (
    AutoencoderKLCogVideoX,
    Decoder3D,
    DecoderOutput,
    SUPPORTED_DTYPES,
    DiagonalGaussianDistribution,
    Encoder3D,
    TilingConfig,
    compiler_options,
    default_compute_dtype,
    frame_batches,
    resolve_dtype,
)


class _ShapeOnlyRngs:
    """The key source of an abstract build.

    Under ``nnx.eval_shape`` no parameter value is ever computed, so every draw may use one
    constant key. ``nnx.Rngs`` would bump its ``RngCount`` variable on each draw, and under tracing
    each bump makes flax read the tracer's ``sharding``, whose error path walks the whole jaxpr
    built so far (jax 0.10): 0.9 s of the 1.2 s abstract build of the full-size VAE.
    """

    def params(self):
        import jax

        return jax.random.key(0)


def abstract_model(config: VAEConfig, *, dtype=None, param_dtype=None):
    """The model with every parameter a ``jax.ShapeDtypeStruct``: no weights are allocated."""
    from flax import nnx
    import jax.numpy as jnp

    return nnx.eval_shape(
        lambda: AutoencoderKLCogVideoX(
            config,
            dtype=dtype,
            param_dtype=jnp.float32 if param_dtype is None else param_dtype,
            rngs=_ShapeOnlyRngs(),
        )
    )


__all__ = [
    "AutoencoderKLCogVideoX",
    "ConfigError",
    "Decoder3D",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "Encoder3D",
    "HANDLED_KEYS",
    "IGNORED_KEYS",
    "PRESETS",
    "SUPPORTED_DTYPES",
    "TilingConfig",
    "VAEConfig",
    "abstract_model",
    "compiler_options",
    "default_cache_dir",
    "default_compute_dtype",
    "enable_compilation_cache",
    "frame_batches",
    "replicate",
    "resolve_dtype",
    "video_sharding",
]
