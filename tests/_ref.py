"""Reference helpers: diffusers' AutoencoderKLCogVideoX built in-process, and error bookkeeping.

Nothing here is faked: the reference is diffusers itself (torch on CPU) with random weights drawn
from ``torch.manual_seed``. Weights are scaled so that activations stay of order one, which keeps
the absolute tolerance meaningful.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch

from cogvae.converter.loading import model_from_tensors
from cogvae.model import VAEConfig

# Tolerances of the parity contract (fp32). Never loosen them.
REL_L2 = 1e-5
MAX_ABS = 1e-4

# Tiny configurations covering 1-3 layers per block, other group counts and latent widths,
# and quant convs (which diffusers sizes by out_channels, so latent_channels == out_channels).
TINY = {
    "l1-g4-z4": dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    "l2-g2-z6": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=2, latent_channels=6),
    "l3-g8-z3-quant": dict(
        block_out_channels=(16, 16, 32),
        layers_per_block=3,
        norm_num_groups=8,
        latent_channels=3,
        use_quant_conv=True,
        use_post_quant_conv=True,
    ),
    "l1-g4-z3-postquant": dict(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=3, use_post_quant_conv=True
    ),
}


def diffusers_vae(seed: int = 0, scale_weights: bool = True, **config):
    """diffusers' AutoencoderKLCogVideoX with random weights (eval mode, fp32)."""
    from diffusers import AutoencoderKLCogVideoX

    n = len(config.get("block_out_channels", (128, 256, 256, 512)))
    config.setdefault("down_block_types", ("CogVideoXDownBlock3D",) * n)
    config.setdefault("up_block_types", ("CogVideoXUpBlock3D",) * n)
    torch.manual_seed(seed)
    model = AutoencoderKLCogVideoX(**config).eval()
    if scale_weights:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim > 1:  # conv kernels: unit-gain Gaussian, so activations stay O(1)
                    fan_in = p[0].numel()
                    p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
                elif "norm" in name and name.endswith("weight"):  # GroupNorm scale around 1
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:  # biases
                    p.copy_(0.1 * torch.randn_like(p))
    return model


def state_arrays(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def to_nnx(model, **kwargs):
    """Convert a diffusers model in memory through the project's mapping engine (fp32 compute)."""
    cfg = VAEConfig.from_diffusers_config(dict(model.config))
    kwargs.setdefault("compute_dtype", jnp.float32)
    return model_from_tensors(cfg, state_arrays(model), source_name="<diffusers state_dict>", **kwargs)


def to_bthwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 4, 1))


def to_bcthw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 4, 1, 2, 3)


ERRORS: list[tuple[str, float, float]] = []


def assert_parity(ours, ref: torch.Tensor, case: str) -> None:
    """ours (B, T, H, W, C) against diffusers' (B, C, T, H, W), within the fp32 contract."""
    a = to_bcthw(ours).astype(np.float64)
    b = ref.detach().numpy().astype(np.float64)
    assert a.shape == b.shape, f"{case}: shape {a.shape} != diffusers {b.shape}"
    assert np.isfinite(a).all(), f"{case}: non-finite output"
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    mx = float(np.abs(a - b).max())
    ERRORS.append((case, rel, mx))
    assert rel <= REL_L2 and mx <= MAX_ABS, f"{case}: rel L2 {rel:.3e} (<= {REL_L2}), max abs {mx:.3e} (<= {MAX_ABS})"
