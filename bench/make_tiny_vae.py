"""Generate the tiny CogVideoX VAE shipped as package data (``converter/assets/tiny-cogvideox-vae/``).

Shapes follow the real CogVideoX VAE (4 down/up blocks, 16 latent channels, temporal compression
4) with few channels, so the whole model is well under 1 MB. Deterministic: ``torch.manual_seed(0)``.

    python bench/make_tiny_vae.py [OUT_DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

TINY_CONFIG = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
    sample_height=64,
    sample_width=64,
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "converter" / "assets" / "tiny-cogvideox-vae"


def main(out: Path = DEFAULT_OUT) -> Path:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(**TINY_CONFIG).eval()
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size} bytes, {sum(p.numel() for p in vae.parameters())} parameters)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    main(ap.parse_args().out)
