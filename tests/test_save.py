"""A JAX fine-tune, saved and sent back: ``cogvae.converter.save`` and ``export_diffusers(model)``.

The model is the tiny diffusers-format VAE shipped with the package, loaded with ``load``, and
fine-tuned for real: one SGD step on a reconstruction loss through the compiled encode and decode
(``nnx.grad``). Its checkpoint is written by the real Orbax and msgpack writers, loaded back by
``load``, and its diffusers export is loaded by diffusers' own ``from_pretrained``, whose decode
must match the fine-tuned model's within the parity contract. The Hub is not involved, except where
``save(..., base=<repo id>)`` looks a base up (an offline Hub cache, or a Hub that cannot be
reached: each such test's docstring says what is faked); the push of a saved checkpoint is covered
by tests/test_push.py with its recording HfApi.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flax import nnx

from _ref import assert_parity, to_bthwc
from cogvae.converter import ConversionError, SourceError, export_diffusers, load, model_params, save
from cogvae.converter.checkpoint import read_checkpoint
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
    for verb, write in (("save", lambda out: save(vae, out)), ("export", lambda out: export_diffusers(vae, out))):
        out = tmp_path / "out"
        with pytest.raises(ConversionError) as e:
            write(out)
        msg = str(e.value)
        assert msg.startswith(f"cannot {verb} <in-memory model>"), msg[:80]
        assert "'decoder.conv_out.conv.kernel': contains non-finite values: 1 NaN, 0 Inf" in msg
        assert "'encoder.conv_in.conv.bias': contains non-finite values: 0 NaN," in msg
        assert "'decoder.adapter' (4, 4): not part of the CogVideoX VAE architecture" in msg
        assert not out.exists() and not list(tmp_path.glob(".*"))


def unchecked_checkpoint(out, params, config, formats=("msgpack",)):
    """A checkpoint folder with ``params`` as given, written by the same file writers as
    ``write_checkpoint`` (``write_into`` + ``finish_into``: files, then the COMPLETE manifest) but
    without its checks, as a third-party trainer or an older cogvae may have written one."""
    from cogvae.converter.checkpoint import finish_into, write_into

    out.mkdir()
    finish_into(out, formats, {}, write_into(out, params, config, formats=formats))
    return out


def test_export_diffusers_refuses_a_checkpoint_with_non_finite_values(tmp_path):
    """A checkpoint written without save's checks (see ``unchecked_checkpoint``) is refused by the
    command: exit 3, the tensor named, nothing at --out."""
    vae = load(default_source(), compute_dtype=jnp.float32)
    params = model_params(vae)
    params["decoder.conv_out.conv.bias"] = params["decoder.conv_out.conv.bias"].copy()
    params["decoder.conv_out.conv.bias"][1] = np.nan
    unchecked_checkpoint(tmp_path / "bad", params, vae.config)
    r = CliRunner().invoke(cli, ["export-diffusers", str(tmp_path / "bad"), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 3
    assert "'decoder.conv_out.conv.bias': contains non-finite values: 1 NaN" in r.stderr
    assert not (tmp_path / "exp").exists()



# ----------------------------------------------------------------------------------------
# save(..., base=): the base is checked before any work
# ----------------------------------------------------------------------------------------


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline. Faked, and why: there is no network here, so
    huggingface_hub's HF_HUB_CACHE / HF_HUB_OFFLINE constants (read at import time) are patched
    to point at a real, empty cache in offline mode; the real snapshot_download answers."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_work(monkeypatch):
    """save's first piece of work (reading the model's parameters) replaced by a failure, to prove
    that a bad base is refused before it."""
    import cogvae.converter.saving as saving

    def boom(*a, **k):
        raise AssertionError("the base must be checked before any work")

    monkeypatch.setattr(saving, "model_params", boom)


@pytest.fixture(scope="module")
def tiny_model():
    return load(default_source(), compute_dtype=jnp.float32)


def _bad_base(kind, root, cache):
    """A base of each wrong kind (a path, relative to ``root`` where relative)."""
    from _hubcache import add_snapshot

    if kind == "missing-repo-like":  # a local path typed from another working directory
        return "checkpoints/cogvideox-2b"
    if kind == "missing-local":
        return "./checkpoints/cogvideox-2b"
    if kind in ("no-manifest", "file-missing"):
        ckpt = root / "half"
        convert(None, ckpt, quiet=True, validate=False, formats=("msgpack",))
        (ckpt / ("COMPLETE" if kind == "no-manifest" else "params.msgpack")).unlink()
        return "half"
    if kind == "neither":
        (root / "notes").mkdir()
        (root / "notes" / "README.md").write_text("hello")
        return "notes"
    if kind == "file":
        (root / "ckpt.msgpack").write_bytes(b"\0")
        return "ckpt.msgpack"
    if kind == "hub-neither":  # a Hub repo (cached) that is no model
        (root / "readme").write_text("# a dataset card")
        add_snapshot(cache, "me/not-a-model", {"README.md": root / "readme"}, commit="9" * 40)
        return "me/not-a-model"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,error,message", [
    ("missing-repo-like", "HubError",
     r"base checkpoints/cogvideox-2b: no such local folder, so it was looked up on the Hugging Face Hub: "
     r"checkpoints/cogvideox-2b is not in the Hub cache .* offline mode is on .*pass base= the local checkpoint"),
    ("missing-local", "HubError", r"base \./checkpoints/cogvideox-2b: no such folder$"),
    ("no-manifest", "CheckpointError", r"base half: not a complete converted checkpoint: .*no COMPLETE manifest"),
    ("file-missing", "CheckpointError", r"base half: not a complete converted checkpoint: .*params.msgpack: missing"),
    ("neither", "SourceError", r"base notes: neither a converted cogvae checkpoint nor a diffusers VAE: "),
    ("file", "SourceError", r"base ckpt.msgpack: not a folder"),
    ("hub-neither", "HubError", rf"base me/not-a-model@{'9' * 40}: neither a converted cogvae checkpoint"),
])
def test_a_wrong_base_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch, offline_cache, kind, error,
                                                message, no_work):
    """A base that is not a local checkpoint or diffusers folder, nor a model on the Hub, is an
    error naming it (it used to be recorded as a Hub repo, or silently accepted when incomplete),
    raised before the model is read; nothing is written. Faked: the Hub is an empty (or, for
    'hub-neither', a one-repo) offline cache, see ``offline_cache``."""
    monkeypatch.chdir(tmp_path)
    base = _bad_base(kind, tmp_path, offline_cache)
    with pytest.raises(Exception) as e:
        save(tiny_model, tmp_path / "ft", base=base)
    assert type(e.value).__name__ == error
    import re

    assert re.search(message, str(e.value)), str(e.value)
    assert not (tmp_path / "ft").exists() and not list(tmp_path.glob(".ft*"))


def test_a_repo_id_base_not_on_the_hub_says_where_it_looked(tiny_model, tmp_path, monkeypatch, no_work):
    """Online, a repo id that is neither a local folder nor on the Hub. Faked, and why: no network,
    so snapshot_download is replaced by a function raising huggingface_hub's real
    RepositoryNotFoundError (on a real httpx2 404 response), as the Hub answers an unknown repo."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from cogvae.converter.hub import HubError

    def not_found(**kwargs):
        resp = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
        raise RepositoryNotFoundError("404 Client Error", response=resp)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match=r"^base checkpoints/cogvideox-2b: no such local folder, and repository not "
                                       r"found on the Hugging Face Hub"):
        save(tiny_model, tmp_path / "ft", base="checkpoints/cogvideox-2b")
    assert not (tmp_path / "ft").exists()


def test_an_unreachable_hub_with_nothing_cached_is_an_error(tiny_model, tmp_path, monkeypatch, no_work):
    """Online mode, but the Hub cannot be reached: the base cannot be checked, so it is an error
    with the advice to pass the local checkpoint. Faked, and why: no network; the Hub endpoint is
    pointed at a closed local port (real connection errors, nothing leaves the machine) and the
    cache is an empty folder."""
    import socket

    import huggingface_hub.constants

    from cogvae.converter.hub import HubError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(HubError) as e:
        save(tiny_model, tmp_path / "ft", base="me/vae-jax")
    msg = str(e.value)
    assert msg.startswith("base me/vae-jax: no such local folder, so it was looked up on the Hugging Face Hub: ")
    assert "the Hub cannot be reached" in msg and "pass base= the local checkpoint folder" in msg
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("kind", ["checkpoint", "diffusers", "pipeline"])
def test_a_local_base_is_recorded_as_what_it_is(tiny_model, tmp_path, kind):
    """A complete checkpoint, a diffusers VAE folder and a pipeline folder (with vae/) are accepted
    and recorded with their kind; none is taken for a Hub repo. No Hub involved."""
    import shutil

    if kind == "checkpoint":
        base = tmp_path / "ckpt"
        convert(None, base, quiet=True, validate=False, formats=("msgpack",))
    elif kind == "diffusers":
        base = default_source()
    else:
        base = tmp_path / "pipe"
        shutil.copytree(default_source(), base / "vae")
        (base / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    summary = save(tiny_model, tmp_path / "ft", base=base, validate=False, formats="msgpack")
    prov = json.loads((tmp_path / "ft" / "provenance.json").read_text())
    assert prov["base"] == summary["base"]
    assert prov["base"]["id"] == str(base) and prov["base"]["is_hub"] is False
    assert prov["base"]["kind"] == ("checkpoint" if kind == "checkpoint" else "diffusers")
    assert prov["source"]["is_hub"] is False and prov["source"]["saved_from"] == "<in-memory model>"


@pytest.mark.parametrize("kind", ["checkpoint", "diffusers", "hub-checkpoint", "hub-pipeline"])
def test_a_base_of_another_network_is_refused_before_any_work(tiny_model, tmp_path, offline_cache, no_work, kind):
    """A base whose config.json has other settings than the model's was recorded, and the card's
    `cogvae verify --reference <base>` then failed on them. Each kind of base, local and on the
    Hub (faked: a pre-populated offline cache, see ``offline_cache``), is now compared, setting
    by setting, before any work."""
    import shutil

    from _hubcache import add_snapshot

    other = tmp_path / "other"
    shutil.copytree(default_source(), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(norm_eps=1e-5, scaling_factor=0.7)
    (other / "config.json").write_text(json.dumps(cfg))
    ckpt = tmp_path / "other-ckpt"
    convert(other, ckpt, quiet=True, validate=False, formats=("msgpack",))
    commit = "7" * 40
    if kind == "checkpoint":
        base, where = ckpt, str(ckpt)
    elif kind == "diffusers":
        base, where = other, str(other)
    elif kind == "hub-checkpoint":
        add_snapshot(offline_cache, "me/other-jax", {p.name: p for p in ckpt.iterdir()}, commit=commit)
        base, where = "me/other-jax", f"me/other-jax@{commit}"
    else:
        index = tmp_path / "model_index.json"
        index.write_text(json.dumps({"vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
        files = {"model_index.json": index, **{f"vae/{p.name}": p for p in other.iterdir()}}
        add_snapshot(offline_cache, "org/other", files, commit=commit)
        base, where = "org/other", f"org/other@{commit}"
    with pytest.raises(SourceError) as e:
        save(tiny_model, tmp_path / "ft", base=base)
    assert str(e.value) == (
        f"base {where}: not the network of the model being saved (2 setting(s) differ: norm_eps: 1e-06 in the "
        "model, 1e-05 in the base; scaling_factor: 1.15258426 in the model, 0.7 in the base); pass the base it "
        "was fine-tuned from, or no base")
    assert not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------------------
# export_diffusers checks a checkpoint's architecture as load does
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("problems", [
    ("missing",), ("shape",), ("extra",), ("missing", "shape", "extra", "nan"),
])
def test_export_refuses_a_checkpoint_that_does_not_fit_its_config(tiny_model, tmp_path, problems):
    """A checkpoint whose tensors are missing, mis-shaped or extra (written without checks, see
    ``unchecked_checkpoint``; write_checkpoint used to accept such parameters too):
    export-diffusers used to write it (diffusers' from_pretrained then failed), while load refuses
    it. Now every problem is named in one error (with a non-finite value elsewhere too), exit 3,
    nothing at --out."""
    params = dict(model_params(tiny_model))
    want = []
    if "missing" in problems:
        shape = params.pop("decoder.conv_out.conv.bias").shape
        want.append(f"parameter 'decoder.conv_out.conv.bias' {shape}: missing")
    if "shape" in problems:
        good = params["decoder.conv_in.conv.bias"].shape
        params["decoder.conv_in.conv.bias"] = np.zeros(7, np.float32)
        k = params["encoder.conv_in.conv.kernel"]
        params["encoder.conv_in.conv.kernel"] = np.zeros(k.shape[:3] + (5,) + k.shape[4:], np.float32)
        want += [f"parameter 'decoder.conv_in.conv.bias': shape (7,), the config's architecture has {good}",
                 f"parameter 'encoder.conv_in.conv.kernel': shape {k.shape[:3] + (5,) + k.shape[4:]}, the config's "
                 f"architecture has {k.shape}"]
    if "extra" in problems:
        params["decoder.adapter"] = np.zeros((4, 4), np.float32)
        want.append("parameter 'decoder.adapter' (4, 4): not part of the CogVideoX VAE architecture of its config")
    if "nan" in problems:
        params["encoder.conv_in.conv.bias"] = params["encoder.conv_in.conv.bias"].copy()
        params["encoder.conv_in.conv.bias"][0] = np.nan
        want.append("parameter 'encoder.conv_in.conv.bias': contains non-finite values: 1 NaN")
    ckpt = unchecked_checkpoint(tmp_path / "bad", params, tiny_model.config, formats=("orbax", "msgpack"))
    for fmt in ("orbax", "msgpack"):
        with pytest.raises(ConversionError) as e:
            export_diffusers(ckpt, tmp_path / "exp", format=fmt)
        assert len(e.value.problems) == len(want), str(e.value)
        for w in want:
            assert w in str(e.value)
    r = CliRunner().invoke(cli, ["export-diffusers", str(ckpt), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 3 and f"{len(want)} problem(s)" in r.stderr
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp*"))


# ----------------------------------------------------------------------------------------
# export-diffusers --dtype / --variant: a fine-tune back in the dtype its base is published in
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,variant", [("float16", "fp16"), ("bfloat16", None), ("float32", "ema")])
def test_export_casts_and_names_the_variant_as_diffusers_does(tiny_model, tmp_path, dtype, variant):
    """The tensors are the checkpoint's, cast with numpy (the bytes diffusers' own .to(dtype)
    gives), in the file ``save_pretrained(variant=)`` would write, and ``from_pretrained(variant=)``
    loads them; the model in memory and its checkpoint export the same bytes."""
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    from cogvae.converter.engine import _np_dtype, export_tensors
    from cogvae.converter.mapping import load_mapping

    ckpt = tmp_path / "ckpt"
    save(tiny_model, ckpt, validate=False, formats="msgpack")
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else WEIGHTS
    summary = export_diffusers(ckpt, tmp_path / "exp", dtype=dtype, variant=variant)
    assert summary["files"] == ["config.json", name] and summary["dtype"] == [dtype]
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == sorted(["config.json", name])
    want = {k: v.astype(_np_dtype(dtype)) for k, v in export_tensors(model_params(tiny_model), load_mapping()).items()}
    if dtype == "bfloat16":  # safetensors.numpy cannot read bfloat16: compare the bits through torch
        got = {k: v.view(torch.int16).numpy() for k, v in load_torch(tmp_path / "exp" / name).items()}
        want = {k: v.view(np.int16) for k, v in want.items()}
    else:
        got = load_file(tmp_path / "exp" / name)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    # diffusers loads these tensors as they are (from_pretrained upcasts to float32 unless asked)
    ref = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "exp", variant=variant, torch_dtype=getattr(torch, dtype))
    written = load_torch(tmp_path / "exp" / name)
    assert ref.state_dict().keys() == written.keys()
    assert all(v.dtype == getattr(torch, dtype) and torch.equal(v, written[k]) for k, v in ref.state_dict().items())
    # the same bytes from the model in memory, and through the command
    export_diffusers(tiny_model, tmp_path / "mem", dtype=dtype, variant=variant)
    args = ["export-diffusers", str(ckpt), "--out", str(tmp_path / "cli"), "--dtype", dtype]
    r = CliRunner().invoke(cli, args + (["--variant", variant] if variant else []))
    assert r.exit_code == 0, r.stderr
    for other in ("mem", "cli"):
        assert (tmp_path / other / name).read_bytes() == (tmp_path / "exp" / name).read_bytes()


def test_export_as_float16_refuses_a_weight_that_overflows(tiny_model, tmp_path):
    """A finite fp32 weight beyond float16's range (a fine-tune can drift there) would be Inf in
    the exported file: refused, every such tensor named, nothing written (exit 3)."""
    params = dict(model_params(tiny_model))
    for key in ("decoder.conv_out.conv.bias", "encoder.conv_in.conv.kernel"):
        params[key] = params[key].copy()
        params[key].flat[0] = 1e5
    ckpt = unchecked_checkpoint(tmp_path / "big", params, tiny_model.config)
    with pytest.raises(ConversionError) as e:
        export_diffusers(ckpt, tmp_path / "exp", dtype="float16")
    assert len(e.value.problems) == 2
    for key in ("decoder.conv_out.conv.bias", "encoder.conv_in.conv.kernel"):
        assert f"'{key}': does not fit float16: 1 of" in str(e.value)
    r = CliRunner().invoke(cli, ["export-diffusers", str(ckpt), "--out", str(tmp_path / "exp"), "--dtype", "float16"])
    assert r.exit_code == 3 and "2 problem(s)" in r.stderr
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp*"))
    # bfloat16 holds 1e5: that export is fine
    assert export_diffusers(ckpt, tmp_path / "bf16", dtype="bfloat16")["dtype"] == ["bfloat16"]


@pytest.mark.parametrize("bad", ["../x", "fp16.safetensors", "", "-x", "a b"])
def test_a_variant_that_is_not_a_plain_name_is_a_usage_error(tiny_model, tmp_path, bad):
    ckpt = tmp_path / "ckpt"
    save(tiny_model, ckpt, validate=False, formats="msgpack")
    r = CliRunner().invoke(cli, ["export-diffusers", str(ckpt), "--out", str(tmp_path / "exp"), "--variant", bad])
    assert r.exit_code == 2 and "--variant" in r.stderr
    with pytest.raises(ValueError, match="variant"):
        export_diffusers(ckpt, tmp_path / "exp", variant=bad)
    assert not (tmp_path / "exp").exists()


# ----------------------------------------------------------------------------------------
# export-diffusers: what the folder keeps, what it says, what it refuses
# ----------------------------------------------------------------------------------------


def test_export_gives_back_the_source_config_and_keeps_other_variants(tiny_model, tmp_path):
    """The exported config.json is the one diffusers wrote (its ``_diffusers_version`` kept, keys
    sorted as save_pretrained sorts them), and exporting the fp16 variant over a folder holding
    the fp32 weights keeps them: diffusers then loads either (the Hub's usual layout). A folder
    whose weights belong to another config is refused, not left with a config that lies."""
    from diffusers import AutoencoderKLCogVideoX

    src = json.loads((default_source() / "config.json").read_text())
    assert src.get("_diffusers_version")
    out = tmp_path / "vae"
    export_diffusers(tiny_model, out)
    exported = (out / "config.json").read_text()
    assert json.loads(exported) == {k: v for k, v in src.items() if k != "_name_or_path"} | {
        k: v for k, v in json.loads(exported).items() if k not in src}  # the source's keys, as written
    assert exported == json.dumps(json.loads(exported), indent=2, sort_keys=True) + "\n"
    fp32 = (out / WEIGHTS).read_bytes()

    summary = export_diffusers(tiny_model, out, dtype="float16", variant="fp16", overwrite=True)
    assert summary["kept"] == [WEIGHTS]
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", WEIGHTS,
                                                           "diffusion_pytorch_model.fp16.safetensors"])
    assert (out / WEIGHTS).read_bytes() == fp32
    assert AutoencoderKLCogVideoX.from_pretrained(out).dtype == torch.float32
    assert AutoencoderKLCogVideoX.from_pretrained(out, variant="fp16", torch_dtype=torch.float16).dtype == torch.float16

    other = json.loads((out / "config.json").read_text()) | {"scaling_factor": 0.5}
    (out / "config.json").write_text(json.dumps(other))
    from cogvae.converter.checkpoint import OutputError

    with pytest.raises(OutputError, match=r"holds weights of other variants \(diffusion_pytorch_model.safetensors\) "
                                          r"for another config"):
        export_diffusers(tiny_model, out, dtype="float16", variant="fp16", overwrite=True)
    (out / "config.json").write_text(json.dumps(other | {"scaling_factor": 0.7, "from_a_newer_diffusers": 1}))
    with pytest.raises(OutputError, match=r"but its config.json cannot be read to tell whether they fit"):
        export_diffusers(tiny_model, out, dtype="float16", variant="fp16", overwrite=True)
    assert (out / WEIGHTS).read_bytes() == fp32  # untouched


def test_export_of_a_model_names_every_problem_at_once_and_refuses_a_state(tiny_model, tmp_path):
    """In memory as from a checkpoint: a NaN and a float16 overflow in one error (the cast used to
    be checked only after the NaN was reported). An nnx.State (the functional training API) is a
    TypeError saying what to pass, not a 'file name too long' naming its whole repr."""
    vae = load(default_source(), compute_dtype=jnp.float32)
    params = nnx.state(vae, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    for path, value in (((("decoder", "conv_out", "conv", "bias")), np.nan), (("encoder", "conv_in", "conv", "bias"), 1e5)):
        var = flat[path]
        var.set_value(var.get_value().at[0].set(value))
    nnx.update(vae, params)
    with pytest.raises(ConversionError) as e:
        export_diffusers(vae, tmp_path / "x", dtype="float16")
    assert len(e.value.problems) == 2, str(e.value)
    assert "'decoder.conv_out.conv.bias': contains non-finite" in str(e.value)
    assert "'encoder.conv_in.conv.bias': does not fit float16" in str(e.value)
    with pytest.raises(TypeError, match=r"got State \(for an nnx.State, nnx.update the model with it"):
        export_diffusers(nnx.split(tiny_model)[1], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_diffusers_command_says_what_it_kept(tmp_path):
    """`cogvae export-diffusers --overwrite` into a folder holding another variant's weights keeps
    them (as above), which its text output did not say: an earlier model's fp16 weights could sit,
    unnoticed, next to a new model's fp32 ones. stdout stays the folder alone (for scripts); the
    note goes to stderr, and --json has it as "kept"."""
    ck = tmp_path / "ck"
    convert(None, ck, validate=False, quiet=True)
    out = tmp_path / "vae"
    r = CliRunner().invoke(cli, ["export-diffusers", str(ck), "--out", str(out), "--dtype", "float16",
                                 "--variant", "fp16"])
    assert (r.exit_code, r.stdout, r.stderr) == (0, f"{out}\n", "")  # nothing was there to keep
    r = CliRunner().invoke(cli, ["export-diffusers", str(ck), "--out", str(out), "--overwrite"])
    assert (r.exit_code, r.stdout) == (0, f"{out}\n")
    assert r.stderr == (f"kept: diffusion_pytorch_model.fp16.safetensors (weights of other variants, already in "
                        f"{out}; not written by this export)\n")
    r = CliRunner().invoke(cli, ["export-diffusers", str(ck), "--out", str(out), "--overwrite", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kept"] == ["diffusion_pytorch_model.fp16.safetensors"]
    assert r.stderr == ""


def test_weights_of_a_dotted_variant_are_kept_as_any_other_variant(tmp_path):
    """An export with --overwrite keeps other variants' weights (as diffusers' save_pretrained
    does); a variant with a dot in its name (diffusion_pytorch_model.v1.5.safetensors, which
    diffusers writes for variant="v1.5") was not recognised as weights and was deleted silently."""
    from cogvae.converter.layout import weights_variant

    assert [weights_variant(n) for n in ("diffusion_pytorch_model.v1.5.safetensors",
                                         "diffusion_pytorch_model.v1.5-00001-of-00002.safetensors",
                                         "diffusion_pytorch_model.v1.5.safetensors.index.json",
                                         "diffusion_pytorch_model.safetensors.index.fp16.json",
                                         "diffusion_pytorch_model.safetensors", "config.json")] == \
        [(True, "v1.5"), (True, "v1.5"), (True, "v1.5"), (True, "fp16"), (True, None), (False, None)]
    ck = tmp_path / "ck"
    convert(None, ck, validate=False, quiet=True)
    out = tmp_path / "vae"
    r = CliRunner().invoke(cli, ["export-diffusers", str(ck), "--out", str(out)])
    assert r.exit_code == 0, r.output
    dotted = out / "diffusion_pytorch_model.v1.5.safetensors"
    shutil.copyfile(out / "diffusion_pytorch_model.safetensors", dotted)
    r = CliRunner().invoke(cli, ["export-diffusers", str(ck), "--out", str(out), "--overwrite", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kept"] == [dotted.name]
    assert dotted.is_file()
