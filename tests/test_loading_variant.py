"""load() on real diffusers output: a sharded fp16 variant written by save_pretrained.

diffusers 0.42 names a sharded variant's index ``diffusion_pytorch_model.safetensors.index.fp16.json``
(not ``...fp16.safetensors.index.json``); both spellings must be found.
"""

import jax.numpy as jnp
import numpy as np
import torch

from _ref import diffusers_vae
from cogvae.converter import load
from cogvae.converter.engine import state_to_flat_dict, export_tensors
from cogvae.converter.mapping import load_mapping
from flax import nnx


def test_sharded_fp16_variant_from_save_pretrained(tmp_path):
    ref = diffusers_vae(seed=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    ref = ref.to(torch.float16)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True, variant="fp16", max_shard_size="20KB")
    names = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    vae = load(tmp_path, variant="fp16", compute_dtype=jnp.float32)  # the parent: a pipeline-like folder
    flat = state_to_flat_dict(nnx.state(vae, nnx.Param))
    assert {a.dtype.name for a in flat.values()} == {"float16"}
    back = export_tensors(flat, load_mapping())
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)
