"""A JAX fine-tune, saved and sent back: ``cogvae.converter.save`` and ``export_diffusers(model)``.

The model is the tiny diffusers-format VAE shipped with the package, loaded with ``load``, and
fine-tuned for real: one SGD step on a reconstruction loss through the compiled encode and decode
(``nnx.grad``). Its checkpoint is written by the real Orbax and msgpack writers, loaded back by
``load``, and its diffusers export is loaded by diffusers' own ``from_pretrained``, whose decode
must match the fine-tuned model's within the parity contract. The Hub is not involved: the push of
a saved checkpoint is covered by tests/test_push.py with its recording HfApi.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flax import nnx

from _ref import assert_parity, to_bthwc
from cogvae.converter import ConversionError, export_diffusers, load, model_params, save
from cogvae.converter.checkpoint import read_checkpoint, write_checkpoint
from cogvae.converter.cli import cli
from cogvae.converter.convert import convert, default_source

WEIGHTS = "diffusion_pytorch_model.safetensors"


def fine_tune_step(vae, lr: float = 1e-2):
    """One SGD step of the decoder on ||decode(z) - target||^2 (the model is updated in place)."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 16)), jnp.float32)
    target = jnp.asarray(rng.uniform(-1, 1, (1, 8, 32, 32, 3)), jnp.float32)  # 2 latents: 8 frames

    def loss(m):
        return jnp.mean((m.decode(z) - target) ** 2)

    grads = nnx.grad(loss)(vae)
    params = nnx.state(vae, nnx.Param)
    nnx.update(vae, jax.tree.map(lambda p, g: p - lr * g, params, nnx.state(grads, nnx.Param)))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    base = tmp_path_factory.mktemp("save") / "ckpt"
    convert(None, base, quiet=True, validate=False)
    vae = load(base, compute_dtype=jnp.float32)
    before = model_params(vae)
    fine_tune_step(vae)
    return base, vae, before


def test_save_writes_a_checkpoint_load_gives_back(tuned, tmp_path):
    base, vae, before = tuned
    params = model_params(vae)
    assert any(not np.array_equal(params[k], before[k]) for k in params)  # the step changed weights
    out = tmp_path / "tuned"
    summary = save(vae, out, base=base)
    assert summary["ok"] and summary["validation"]["ok"] and summary["num_tensors"] == len(params)
    for fmt in ("orbax", "msgpack"):
        config, stored, _ = read_checkpoint(out, format=fmt)
        assert config == vae.config and sorted(stored) == sorted(params)
        for k, v in params.items():
            assert stored[k].dtype == v.dtype and stored[k].tobytes() == v.tobytes(), (fmt, k)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["source"]["saved_from"] == "<in-memory model>"
    assert prov["base"]["checkpoint"] == str(base) and prov["validation"]["ok"]
    reloaded = load(out, compute_dtype=jnp.float32)
    z = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 4, 4, 16)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(reloaded.decode(z)), np.asarray(vae.decode(z)))
    # like a converted checkpoint: refused when present, cast on request
    with pytest.raises(OSError, match="exists"):
        save(vae, out)
    save(vae, out, dtype="bfloat16", formats="msgpack", overwrite=True, validate=False)
    _, stored, info = read_checkpoint(out)
    assert info["format"] == "msgpack" and {v.dtype.name for v in stored.values()} == {"bfloat16"}


def test_export_diffusers_from_the_model(tuned, tmp_path):
    """diffusers loads the fine-tune and decodes what the JAX model decodes."""
    from diffusers import AutoencoderKLCogVideoX

    _, vae, _ = tuned
    exp = tmp_path / "exported"
    assert export_diffusers(vae, exp)["num_tensors"] == len(model_params(vae))
    ref = AutoencoderKLCogVideoX.from_pretrained(exp).eval()
    torch.manual_seed(3)
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        video = ref.decode(z).sample
    assert_parity(vae.decode(to_bthwc(z)), video, "fine-tune exported to diffusers, decode t=3")
    # the same bytes as exporting the saved checkpoint
    ckpt = tmp_path / "ckpt"
    save(vae, ckpt, validate=False)
    r = CliRunner().invoke(cli, ["export-diffusers", str(ckpt), "--out", str(tmp_path / "via-ckpt")])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "via-ckpt" / WEIGHTS).read_bytes() == (exp / WEIGHTS).read_bytes()
    assert (tmp_path / "via-ckpt" / "config.json").read_text() == (exp / "config.json").read_text()


def test_a_diverged_or_altered_model_is_refused_whole(tmp_path):
    """Every problem in one error naming each tensor; nothing written."""
    vae = load(default_source(), compute_dtype=jnp.float32)
    conv = vae.decoder.conv_out.conv
    conv.kernel[...] = conv.kernel[...].at[0, 0, 0, 0, 0].set(jnp.nan)
    bias = vae.encoder.conv_in.conv.bias
    bias[...] = jnp.full_like(bias[...], jnp.inf)
    vae.decoder.adapter = nnx.Param(jnp.zeros((4, 4)))  # e.g. a LoRA weight left unmerged
    for write in (lambda out: save(vae, out), lambda out: export_diffusers(vae, out)):
        out = tmp_path / "out"
        with pytest.raises(ConversionError) as e:
            write(out)
        msg = str(e.value)
        assert "'decoder.conv_out.conv.kernel': contains non-finite values: 1 NaN, 0 Inf" in msg
        assert "'encoder.conv_in.conv.bias': contains non-finite values: 0 NaN," in msg
        assert "'decoder.adapter' (4, 4): not part of the CogVideoX VAE architecture" in msg
        assert not out.exists() and not list(tmp_path.glob(".*"))


def test_export_diffusers_refuses_a_checkpoint_with_non_finite_values(tmp_path):
    """A checkpoint written without save's checks (write_checkpoint directly, as a third-party
    trainer might) is refused by the command: exit 3, the tensor named, nothing at --out."""
    vae = load(default_source(), compute_dtype=jnp.float32)
    params = model_params(vae)
    params["decoder.conv_out.conv.bias"] = params["decoder.conv_out.conv.bias"].copy()
    params["decoder.conv_out.conv.bias"][1] = np.nan
    write_checkpoint(tmp_path / "bad", params, vae.config, formats=("msgpack",))
    r = CliRunner().invoke(cli, ["export-diffusers", str(tmp_path / "bad"), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 3
    assert "'decoder.conv_out.conv.bias': contains non-finite values: 1 NaN" in r.stderr
    assert not (tmp_path / "exp").exists()

