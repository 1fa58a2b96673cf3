"""load() on real diffusers output: a sharded fp16 variant written by save_pretrained.

diffusers 0.42 names a sharded variant's index ``diffusion_pytorch_model.safetensors.index.fp16.json``
(not ``...fp16.safetensors.index.json``); both spellings must be found.
"""

import os

import jax.numpy as jnp
import pytest
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


def test_a_local_pipeline_whose_vae_has_another_name(tmp_path):
    """model_index.json names the pipeline's VAE component: the error says which subfolder."""
    import json
    import shutil

    import pytest

    from cogvae.converter.convert import default_source
    from cogvae.converter.loading import SourceError

    shutil.copytree(default_source(), tmp_path / "vae_2")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "CogVideoXPipeline", "vae_2": ["diffusers", "AutoencoderKLCogVideoX"]}))
    with pytest.raises(SourceError, match=r"without a 'vae/' VAE subfolder \(its model_index.json names the VAE "
                                          r"'vae_2': pass --subfolder vae_2\)"):
        load(tmp_path)
    load(tmp_path, subfolder="vae_2")


def test_diffusers_options_on_a_local_checkpoint(tmp_path):
    """variant= / mapping= / a non-default subfolder on a converted checkpoint folder: a clear
    ValueError (they apply to diffusers weights), not a TypeError from load_checkpoint; the default
    subfolder (with or without slashes) is ignored. The checkpoint is a real one, converted from
    the tiny VAE shipped with cogvae."""
    import pytest

    from cogvae.converter.convert import convert
    from cogvae.converter.mapping import load_mapping

    ckpt = tmp_path / "ckpt"
    convert(None, ckpt, quiet=True, validate=False, formats="msgpack")
    base = state_to_flat_dict(nnx.state(load(ckpt), nnx.Param))
    for kw in ({"subfolder": "vae"}, {"subfolder": "/vae/"}, {"subfolder": ""}, {"variant": None}):
        flat = state_to_flat_dict(nnx.state(load(ckpt, **kw), nnx.Param))
        assert all(np.array_equal(flat[k], base[k]) for k in base)
    with pytest.raises(ValueError, match=r"a converted cogvae checkpoint: variant= applies to diffusers weights only"):
        load(ckpt, variant="fp16")
    with pytest.raises(ValueError, match=r"subfolder= applies to diffusers weights only"):
        load(ckpt, subfolder="autoencoder")
    with pytest.raises(ValueError, match=r"mapping= applies to diffusers weights only"):
        load(ckpt, mapping=load_mapping())


def test_a_subfolder_with_slashes_on_a_local_pipeline(tmp_path):
    """'/vae', 'vae/' name the folder vae/ of a local pipeline folder, as for a Hub repo."""
    import shutil

    from cogvae.converter.convert import default_source
    from cogvae.converter.loading import find_diffusers_vae

    shutil.copytree(default_source(), tmp_path / "vae")
    for sub in ("/vae", "vae/", "/vae/"):
        assert find_diffusers_vae(tmp_path, subfolder=sub).folder == tmp_path / "vae"
    load(tmp_path, subfolder="/vae")


def test_a_folder_with_an_index_and_a_single_file_is_read_as_diffusers_reads_it(tmp_path):
    """diffusers' from_pretrained loads the sharded index when the folder also has the single
    file (``_fetch_index_file`` first); converting the single file instead gave other weights than
    diffusers, silently. Checked against diffusers itself."""
    import pytest

    from cogvae.converter.loading import find_diffusers_vae
    from cogvae.converter.st_io import save_safetensors

    ref = diffusers_vae(seed=5, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True, max_shard_size="20KB")  # the index + shards
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    save_safetensors({k: v + 1 for k, v in sd.items()}, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    from diffusers import AutoencoderKLCogVideoX

    theirs = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae").state_dict()
    k = "decoder.conv_out.conv.bias"
    np.testing.assert_array_equal(theirs[k].numpy(), sd[k])  # diffusers: the shards, not the single file
    assert find_diffusers_vae(tmp_path).weights_path.name == "diffusion_pytorch_model.safetensors.index.json"
    vae = load(tmp_path, compute_dtype=jnp.float32)
    back = export_tensors(state_to_flat_dict(nnx.state(vae, nnx.Param)), load_mapping())
    for key, v in sd.items():
        np.testing.assert_array_equal(back[key], v)


def test_a_subfolder_out_of_the_folder_is_refused(tmp_path):
    """--subfolder names a folder inside the repo or pipeline folder; '../elsewhere' converted
    whatever lay there (a shard path out of its folder is refused the same way)."""
    import shutil

    import pytest
    from click.testing import CliRunner

    from cogvae.converter.cli import cli
    from cogvae.converter.convert import default_source
    from cogvae.converter.loading import find_diffusers_vae

    shutil.copytree(default_source(), tmp_path / "elsewhere")
    (tmp_path / "pipe").mkdir()
    for sub in ("../elsewhere", "vae/../../elsewhere", "/../elsewhere"):
        with pytest.raises(ValueError, match=r"name a folder inside the repo or pipeline folder \(no '\.\.'\)"):
            find_diffusers_vae(tmp_path / "pipe", subfolder=sub)
    for args in (["convert", str(tmp_path / "pipe"), "--out", str(tmp_path / "out")], ["inspect", str(tmp_path / "pipe")],
                 ["verify", str(tmp_path / "pipe")]):
        r = CliRunner().invoke(cli, args + ["--subfolder", "../elsewhere"])
        assert r.exit_code == 2 and "no '..'" in r.stderr, (args, r.output)
    assert not (tmp_path / "out").exists()


def test_an_empty_variant_is_refused_as_export_diffusers_refuses_it(tmp_path):
    """``--variant ''`` read the weights without a variant in convert, inspect and verify (diffusers
    looks for 'diffusion_pytorch_model..safetensors'), while export-diffusers refused it: now a
    usage error everywhere (exit 2), and a ValueError from the Python API."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli
    from cogvae.converter.convert import default_source
    from cogvae.converter.hub import resolve_source
    from cogvae.converter.loading import find_diffusers_vae

    src = str(default_source())
    for call in (lambda: load(src, variant=""), lambda: find_diffusers_vae(src, variant=" "),
                 lambda: resolve_source("org/name", variant="", cache_dir=tmp_path / "hub")):
        with pytest.raises(ValueError, match="an empty variant names no weights file"):
            call()
    ckpt = tmp_path / "ckpt"
    assert CliRunner().invoke(cli, ["convert", "--out", str(ckpt), "--no-validate", "-q"]).exit_code == 0
    for args in (["convert", src, "--out", str(tmp_path / "out"), "--variant", ""], ["inspect", src, "--variant", ""],
                 ["verify", src, "--variant", ""], ["verify", str(ckpt), "--reference", src, "--reference-variant", ""],
                 ["export-diffusers", str(ckpt), "--out", str(tmp_path / "out"), "--variant", ""]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "Invalid value for " in r.stderr and "variant" in r.stderr, (args, r.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, make, message", [
    ("diffusion_pytorch_model.safetensors", lambda p: p.symlink_to("/nonexistent/blob"),
     "is a broken symlink (to /nonexistent/blob, which does not exist): cannot read the VAE weights"),
    ("diffusion_pytorch_model.safetensors", lambda p: p.mkdir(), "is a folder, not a file: cannot read the VAE weights"),
    ("config.json", lambda p: p.symlink_to("/nonexistent/config"),
     "is a broken symlink (to /nonexistent/config, which does not exist): cannot read the VAE config"),
    # a FIFO was "no such file (found: ...)", and a FIFO config.json "not a diffusers VAE folder"
    ("diffusion_pytorch_model.safetensors", lambda p: os.mkfifo(p),
     "is a FIFO, not a regular file: cannot read the VAE weights"),
    ("config.json", lambda p: os.mkfifo(p), "is a FIFO, not a regular file: cannot read the VAE config"),
], ids=["weights-broken-link", "weights-folder", "config-broken-link", "weights-fifo", "config-fifo"])
def test_a_file_that_is_there_but_cannot_be_read_is_named_as_such(tmp_path, name, make, message):
    """A Hub cache whose blob was deleted leaves broken symlinks: the message said the file was
    missing (or not a VAE folder) while listing it as found."""
    import shutil

    from click.testing import CliRunner

    from cogvae.converter.cli import cli
    from cogvae.converter.convert import default_source

    shutil.copytree(default_source(), tmp_path / "vae")
    (tmp_path / "vae" / name).unlink()
    make(tmp_path / "vae" / name)
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "vae")])
    assert r.exit_code == 3 and f"Error: {tmp_path / 'vae' / name} {message}" in r.stderr, r.stderr


def test_a_float64_source_is_cast_when_a_dtype_is_given(tmp_path):
    """diffusers loads float64 weights (``torch_dtype=torch.float32`` casts them); cogvae refused
    them whatever the dtype asked for. With ``dtype=`` they are cast as diffusers casts them (the
    same float32 bits), a value float32 cannot hold is refused, and without it the refusal says
    what to pass."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogvae.converter import ConversionError
    from cogvae.converter.st_io import save_safetensors

    ref = diffusers_vae(seed=6, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    sd = {k: v.numpy().astype(np.float64) for k, v in ref.state_dict().items()}
    save_safetensors(sd, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    theirs = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae", torch_dtype=torch.float32).state_dict()
    vae = load(tmp_path, dtype="float32")
    back = export_tensors(state_to_flat_dict(nnx.state(vae, nnx.Param)), load_mapping())
    for k, v in theirs.items():
        assert back[k].dtype == np.float32 and np.array_equal(back[k], v.numpy()), k
    with pytest.raises(ConversionError, match=r"dtype float64 not allowed .*; cast it with dtype= "
                                              r"\(cogvae-convert --dtype float32\)"):
        load(tmp_path)
    sd["decoder.conv_out.conv.bias"][0] = 1e300
    save_safetensors(sd, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError, match=r"'decoder.conv_out.conv.bias': does not fit float32: 1 of 3"):
        load(tmp_path, dtype="float32")


@pytest.mark.parametrize("index_name, diffusers_reads_the_index", [
    ("diffusion_pytorch_model.safetensors.index.fp16.json", True),   # diffusers' own spelling
    ("diffusion_pytorch_model.safetensors.fp16.index.json", True),   # its older one (_fetch_index_file_legacy)
    ("diffusion_pytorch_model.fp16.safetensors.index.json", False),  # one diffusers never reads
])
def test_variant_weights_are_the_ones_diffusers_loads(tmp_path, index_name, diffusers_reads_the_index):
    """An fp16 variant with sharded weights (the shards' values) and a single file (the shards'
    values + 1): cogvae converts what ``from_pretrained(variant="fp16")`` loads, whichever index
    spelling the folder has."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogvae.converter.loading import find_diffusers_vae
    from cogvae.converter.st_io import save_safetensors

    ref = diffusers_vae(seed=7, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    ref = ref.to(torch.float16)
    vae_dir = tmp_path / "vae"
    ref.save_pretrained(vae_dir, safe_serialization=True, variant="fp16", max_shard_size="20KB")
    (vae_dir / "diffusion_pytorch_model.safetensors.index.fp16.json").rename(vae_dir / index_name)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    single = {k: v + np.float16(1) for k, v in sd.items()}
    save_safetensors(single, vae_dir / "diffusion_pytorch_model.fp16.safetensors")
    theirs = AutoencoderKLCogVideoX.from_pretrained(vae_dir, variant="fp16", torch_dtype=torch.float16).state_dict()
    want = sd if diffusers_reads_the_index else single
    k = "decoder.conv_out.conv.bias"
    np.testing.assert_array_equal(theirs[k].numpy(), want[k])  # what diffusers chose
    found = find_diffusers_vae(tmp_path, variant="fp16").weights_path.name
    assert found == (index_name if diffusers_reads_the_index else "diffusion_pytorch_model.fp16.safetensors")
    back = export_tensors(state_to_flat_dict(nnx.state(load(tmp_path, variant="fp16"), nnx.Param)), load_mapping())
    for key, v in want.items():
        np.testing.assert_array_equal(back[key], v)


@pytest.mark.parametrize("has, asked, tip", [
    (["fp16"], None, "it has variant='fp16' (--variant fp16)"),
    ([None, "bf16"], "fp16", "it has the weights without a variant (leave out variant / --variant); "
                             "variant='bf16' (--variant bf16)"),
    ([None], "fp16", "it has the weights without a variant (leave out variant / --variant)"),
    (["v1.5"], None, "it has variant='v1.5' (--variant v1.5)"),  # a variant with a dot, as diffusers writes it
], ids=["only-fp16", "plain-and-bf16", "only-plain", "dotted"])
def test_weights_of_another_variant_are_named_with_the_option_that_reads_them(tmp_path, has, asked, tip):
    """Real save_pretrained folders (shared weights, one file per variant). Weights of the variant
    asked for are missing, as diffusers' from_pretrained would refuse them too; the error says
    which variants the folder has and how to ask for one (it said "only safetensors weights are
    supported" of a folder holding safetensors of another variant)."""
    from cogvae.converter.hub import SourceError

    ref = diffusers_vae(seed=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    for variant in has:
        ref.save_pretrained(tmp_path, safe_serialization=True, variant=variant)
    want = "diffusion_pytorch_model" + (f".{asked}" if asked else "") + ".safetensors[.index.json]"
    with pytest.raises(SourceError) as e:
        load(tmp_path, variant=asked)
    assert str(e.value).startswith(f"{tmp_path}: no {want} (found: ") and str(e.value).endswith(f"; {tip}")
    for variant in has:
        load(tmp_path, variant=variant)  # what the tip says works
