"""End-to-end conversion: the convert pipeline, atomic checkpoints, the CLI (CliRunner and the
installed ``cogvae-convert`` as a subprocess), export back to diffusers, inspect, and every error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from _scripts import script
from cogvae.converter import load
from cogvae.converter.checkpoint import (
    CheckpointError,
    is_converted_checkpoint,
    read_checkpoint,
)
from cogvae.converter.cli import cli, convert_command
from cogvae.converter.convert import convert, default_source
from cogvae.converter.st_io import open_safetensors, save_safetensors

WEIGHTS = "diffusion_pytorch_model.safetensors"
CONVERT_EXE = script("cogvae-convert")


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.update(extra)
    return env


def _run(args, runner_mode="cli"):
    """Run convert via CliRunner; returns (exit_code, stdout, stderr)."""
    r = CliRunner().invoke(convert_command, args, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _sub(args, **env):
    p = subprocess.run([CONVERT_EXE, *args], capture_output=True, text=True, env=_env(**env), timeout=300)
    return p.returncode, p.stdout, p.stderr


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A writable copy of the embedded tiny diffusers VAE."""
    d = tmp_path_factory.mktemp("tiny") / "vae"
    shutil.copytree(default_source(), d)
    return d


@pytest.fixture(scope="module")
def tiny_tensors(tiny) -> dict[str, np.ndarray]:
    f = open_safetensors(tiny / WEIGHTS)
    return {k: np.array(f[k]) for k in f}


def _copy_with(tmp_path: Path, tiny: Path, *, config: dict | None = None, tensors: dict | None = None,
               name: str = "src") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        shutil.copy(tiny / WEIGHTS, d / WEIGHTS)
    else:
        save_safetensors(tensors, d / WEIGHTS, metadata={"format": "pt"})
    return d


# ----------------------------------------------------------------------------------------
# happy paths
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, files", [
    ("orbax", {"orbax"}),
    ("msgpack", {"params.msgpack"}),
    ("both", {"orbax", "params.msgpack"}),
])
def test_convert_formats(tiny, tiny_tensors, tmp_path, fmt, files):
    out = tmp_path / "ckpt"
    code, stdout, stderr = _run([str(tiny), "--out", str(out), "--format", fmt, "--no-validate", "--json"])
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["ok"] and summary["num_tensors"] == len(tiny_tensors)
    names = {p.name for p in out.iterdir()}
    assert names == files | {"config.json", "provenance.json", "COMPLETE"}
    assert is_converted_checkpoint(out)
    assert _leftovers(tmp_path, "ckpt") == []
    for f in (["orbax", "msgpack"] if fmt == "both" else [fmt]):
        config, params, info = read_checkpoint(out, format=f)
        assert info["format"] == f
        assert config.block_out_channels == (8, 16, 16, 16)
        # a conv kernel: (O, I, T, H, W) -> (T, H, W, I, O), bit-identical
        w = tiny_tensors["decoder.conv_in.conv.weight"]
        np.testing.assert_array_equal(params["decoder.conv_in.conv.kernel"], w.transpose(2, 3, 4, 1, 0))
        assert len(params) == len(tiny_tensors)
    vae = load(out)
    assert vae.config.latent_channels == 16


def test_convert_validates_by_default_and_records_provenance(tiny, tmp_path):
    out = tmp_path / "ckpt"
    code, stdout, stderr = _run([str(tiny), "--out", str(out), "--json"])
    assert code == 0, stderr
    assert "validation: OK" in stderr
    v = json.loads(stdout)["validation"]
    assert v["ok"] and v["formats_identical"]
    assert set(v["formats"]) == {"orbax", "msgpack"}
    assert all(e["finite"] and e["params_match_converted"] for e in v["formats"].values())
    assert v["latent_shape"] == [1, 1, 4, 4, 16]  # 8x spatial compression: 32x32 frames
    assert v["formats"]["orbax"]["output_shape"] == v["formats"]["msgpack"]["output_shape"] == [1, 1, 32, 32, 3]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["validation"] == v
    assert prov["validation"]["backend"] and prov["validation"]["device_kind"]
    import hashlib

    files = {f["name"]: f for f in prov["source"]["files"]}
    assert files[WEIGHTS]["sha256"] == hashlib.sha256((tiny / WEIGHTS).read_bytes()).hexdigest()
    assert files["config.json"]["sha256"] == hashlib.sha256((tiny / "config.json").read_bytes()).hexdigest()
    assert prov["mapping"]["path"].endswith("cogvideox_vae.yaml") and len(prov["mapping"]["sha256"]) == 64
    assert set(prov["versions"]) >= {"cogvae", "jax", "flax"} and prov["versions"]["jax"]
    assert prov["formats"] == ["orbax", "msgpack"] and prov["created"]


# ----------------------------------------------------------------------------------------
# validation: each format loaded into one model, a smoke decode, both formats compared
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    """A converted tiny checkpoint (both formats) and the digests of what was converted."""
    from cogvae.converter.checkpoint import tensor_digest

    out = tmp_path_factory.mktemp("written") / "ckpt"
    convert(str(tiny), out, quiet=True, validate=False)
    _, params, _ = read_checkpoint(out, format="msgpack")
    return out, {k: tensor_digest(v) for k, v in params.items()}


def _damaged(written, tmp_path, fmt_gone=None, change=None):
    """A copy of the written folder with one format removed or its msgpack params changed."""
    from cogvae.converter.checkpoint import _read_msgpack, _write_msgpack

    src, _ = written
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    if fmt_gone == "orbax":
        shutil.rmtree(d / "orbax")
    if change is not None:
        params = _read_msgpack(d / "params.msgpack")
        change(params)
        _write_msgpack(d / "params.msgpack", params)
    return d


def _validate(folder, expected):
    from cogvae.converter.convert import validate_checkpoint_dir
    from cogvae.model import VAEConfig

    return validate_checkpoint_dir(folder, VAEConfig.from_json_file(folder / "config.json"), ("orbax", "msgpack"),
                                   expected)


@pytest.mark.parametrize("chunk_bytes", [1, 20_000, 1 << 30])
def test_orbax_streams_in_groups(written, chunk_bytes):
    """iter_orbax restores the tree in partial-restore groups of at most chunk_bytes (1 byte: one
    tensor per group); every tensor arrives once, equal to a whole restore."""
    from cogvae.converter.checkpoint import format_meta, iter_orbax

    out, _ = written
    _, whole, _ = read_checkpoint(out, format="orbax")
    got = list(iter_orbax(out / "orbax", chunk_bytes=chunk_bytes))
    assert sorted(k for k, _ in got) == sorted(whole)
    for k, a in got:
        np.testing.assert_array_equal(np.asarray(a), whole[k])
    assert format_meta(out, "orbax") == format_meta(out, "msgpack") == {
        k: (v.shape, v.dtype) for k, v in whole.items()}


def test_validation_of_a_good_checkpoint(written):
    v = _validate(*written)
    assert v["ok"] and v["formats_identical"] and v["problems"] == []
    assert v["conv_impl"] == "3d" and v["latent_shape"] == [1, 1, 4, 4, 16]
    for e in v["formats"].values():
        assert e["params_match_converted"] and e["finite"] and e["output_shape"] == [1, 1, 32, 32, 3]


def _bump(params):
    k = "decoder.conv_out.conv.kernel"
    params[k] = (params[k] + np.float32(0.01)).astype(params[k].dtype)


def _nan(params):
    k = "decoder.conv_out.conv.bias"
    params[k] = np.full_like(params[k], np.nan)


@pytest.mark.parametrize("change, problems", [
    (_bump, ["msgpack: 1 parameter(s) differ from the converted ones, e.g. 'decoder.conv_out.conv.kernel'",
             "orbax and msgpack parameters (or their decodes) differ"]),
    (lambda p: p.pop("encoder.conv_in.conv.bias"),
     ["msgpack: cannot read back or load into the NNX VAE: {d} (msgpack): parameters do not fit the model: "
      "1 problem(s):\n  - {d} (msgpack): parameter 'encoder.conv_in.conv.bias' (8,): missing",
      "orbax and msgpack parameters (or their decodes) differ"]),
    (lambda p: p.update(extra=np.zeros(3, np.float32)),
     ["msgpack: cannot read back or load into the NNX VAE: {d} (msgpack): parameters do not fit the model: "
      "1 problem(s):\n  - {d} (msgpack): parameter 'extra' (3,): not part of the CogVideoX VAE architecture of its "
      "config (extra)",
      "orbax and msgpack parameters (or their decodes) differ"]),
    (lambda p: p.update({"decoder.conv_out.conv.bias": p["decoder.conv_out.conv.bias"].astype(ml_dtypes.bfloat16)}),
     ["msgpack: cannot read back or load into the NNX VAE: {d} (msgpack): parameters do not fit the model: "
      "1 problem(s):\n  - {d} (msgpack): parameter 'decoder.conv_out.conv.bias' is bfloat16[3], expected float32[3]",
      "orbax and msgpack parameters (or their decodes) differ"]),
    (_nan, ["msgpack: 1 parameter(s) differ from the converted ones, e.g. 'decoder.conv_out.conv.bias'",
            "msgpack: decode output has NaN/Inf",
            "orbax and msgpack parameters (or their decodes) differ"]),
], ids=["changed", "missing", "extra", "dtype", "nan"])
def test_validation_catches_a_bad_second_format(written, tmp_path, change, problems):
    d = _damaged(written, tmp_path, change=change)
    v = _validate(d, written[1])
    assert not v["ok"]
    assert v["formats"]["orbax"]["params_match_converted"] and v["formats"]["orbax"]["finite"]
    assert v["problems"] == [p.format(d=d) for p in problems]


def test_validation_builds_the_model_from_msgpack_when_orbax_is_unreadable(written, tmp_path):
    d = _damaged(written, tmp_path, fmt_gone="orbax")
    v = _validate(d, written[1])
    assert not v["ok"] and "error" in v["formats"]["orbax"]
    assert v["problems"][0] == f"orbax: cannot read back: {d}: no orbax parameters (orbax missing)"
    assert v["formats"]["msgpack"]["params_match_converted"] and v["formats"]["msgpack"]["finite"]


def test_failed_validation_exits_1_and_publishes_nothing(tiny, tmp_path, monkeypatch):
    """Faked: the msgpack writer is wrapped to damage one tensor after writing it, as a bad disk or
    a writer bug would; validation must catch it, exit 1, and leave no folder at --out."""
    import cogvae.converter.checkpoint as ck

    real = ck._write_msgpack

    def damaging(path, params):
        params = dict(params)
        _bump(params)
        return real(path, params)

    monkeypatch.setattr(ck, "_write_msgpack", damaging)
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(tiny), "--out", str(out)])
    assert code == 1
    assert "validation failed: msgpack: 1 parameter(s) differ from the converted ones" in stderr
    assert not out.exists() and _leftovers(tmp_path, "ckpt") == []


@pytest.mark.parametrize("dtype, name", [
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
    (None, "float32"),
])
def test_convert_dtype(tiny, tiny_tensors, tmp_path, dtype, name):
    out = tmp_path / "ckpt"
    args = [str(tiny), "--out", str(out), "--no-validate", "-q"] + (["--dtype", dtype] if dtype else [])
    code, _, stderr = _run(args)
    assert code == 0, stderr
    for f in ("orbax", "msgpack"):
        _, params, _ = read_checkpoint(out, format=f)
        assert {a.dtype.name for a in params.values()} == {name}
        want = tiny_tensors["encoder.conv_in.conv.bias"].astype(params["encoder.conv_in.conv.bias"].dtype)
        np.testing.assert_array_equal(params["encoder.conv_in.conv.bias"], want)
    assert json.loads((out / "provenance.json").read_text())["dtype"]["stored"] == [name]


def test_bf16_source_keeps_dtype_and_validates(tiny, tiny_tensors, tmp_path):
    src = _copy_with(tmp_path, tiny, tensors={k: v.astype(ml_dtypes.bfloat16) for k, v in tiny_tensors.items()})
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(src), "--out", str(out), "-q"])
    assert code == 0, stderr
    _, params, _ = read_checkpoint(out, format="msgpack")
    assert {a.dtype.name for a in params.values()} == {"bfloat16"}


def _sharded(tmp_path: Path, tiny: Path, tensors: dict) -> tuple[Path, dict[str, str]]:
    """``tensors`` in three shards behind an index; (the folder, {key: its shard's file name})."""
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(tiny / "config.json", src / "config.json")
    keys = sorted(tensors)
    parts = [keys[0::3], keys[1::3], keys[2::3]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        save_safetensors({k: tensors[k] for k in part}, src / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return src, weight_map


def _on_first_read(monkeypatch, action):
    """Run ``action(path)`` once, when the converter reads its first tensor: what a concurrent
    writer (a re-download, an editor) does to the source mid-conversion. Faked: the timing only
    (a monkeypatched read_tensor calls the action); the files, reads and checks are real."""
    from cogvae.converter import st_io

    real, done = st_io.SafetensorsFile.read_tensor, []

    def read_tensor(self, key):
        if not done:
            done.append(key)
            action(self.path)
        return real(self, key)

    monkeypatch.setattr(st_io.SafetensorsFile, "read_tensor", read_tensor)
    return done


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_a_source_replaced_mid_conversion_is_converted_from_the_file_first_opened(
        tiny, tiny_tensors, tmp_path, monkeypatch, sharded):
    """A re-download renames a new file over the source while it is converted: every tensor and
    the recorded sha256 come from the file whose header was read (never a mix of the two)."""
    import hashlib

    if sharded:
        src, weight_map = _sharded(tmp_path, tiny, tiny_tensors)
    else:
        src = _copy_with(tmp_path, tiny)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.safetensors")}
    other = {k: (v + 1).astype(v.dtype) for k, v in tiny_tensors.items()}

    def replace(path):
        new = path.with_name(path.name + ".new")
        save_safetensors({k: other[k] for k in open_safetensors(path)}, new, metadata={"format": "pt"})
        os.replace(new, path)

    done = _on_first_read(monkeypatch, replace)
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(src), "--out", str(out), "--no-validate", "-q"])
    assert code == 0, stderr
    assert done
    _, params, _ = read_checkpoint(out)
    for name in ("decoder.conv_in.conv.bias", "encoder.conv_out.conv.bias", "decoder.up_blocks.0.resnets.0.conv1.conv.bias"):
        np.testing.assert_array_equal(params[name], tiny_tensors[name])
    files = {f["name"]: f["sha256"] for f in json.loads((out / "provenance.json").read_text())["source"]["files"]}
    assert {k: v for k, v in files.items() if k.endswith(".safetensors")} == before


def test_a_sharded_source_resharded_mid_conversion_records_the_shards_it_read(tiny, tiny_tensors, tmp_path,
                                                                              monkeypatch):
    """A re-download with another sharding (a new index and new shard files) lands while a
    sharded source is converted: the files recorded in provenance.json are the index and shards
    that were read, with their sha256. They came from a second read of the index, which named
    the new shards: a KeyError traceback."""
    import hashlib

    src, _ = _sharded(tmp_path, tiny, tiny_tensors)
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in [index, *src.glob("*.safetensors")]}

    def reshard(_index):
        keys, weight_map = sorted(tiny_tensors), {}
        for i in range(2):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_safetensors({k: tiny_tensors[k] for k in keys[i::2]}, src / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in keys[i::2]})
        new = index.with_name(index.name + ".new")
        new.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        os.replace(new, index)

    # Faked: the timing only, right after the index and shards are opened (a wrapped __init__)
    from cogvae.converter import st_io

    real, done = st_io.ShardedSafetensors.__init__, []

    def opened(self, *args, **kwargs):
        real(self, *args, **kwargs)
        done.append(True)
        reshard(self.path)

    monkeypatch.setattr(st_io.ShardedSafetensors, "__init__", opened)
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(src), "--out", str(out), "--no-validate", "-q"])
    assert done == [True] and code == 0, stderr
    files = {f["name"]: f["sha256"] for f in json.loads((out / "provenance.json").read_text())["source"]["files"]}
    files.pop("config.json")
    assert files == before


def test_a_source_written_in_place_mid_conversion_is_refused(tiny, tiny_tensors, tmp_path, monkeypatch):
    """A file written in place while it is read may have given a mix of old and new bytes: exit 3
    naming the file, and no checkpoint."""
    src = _copy_with(tmp_path, tiny)
    old = time.time() - 3600  # a download finished an hour ago (its times differ from the write's)
    os.utime(src / WEIGHTS, (old, old))

    def write_in_place(path):
        with open(path, "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(np.float32(7).tobytes())

    _on_first_read(monkeypatch, write_in_place)
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(src), "--out", str(out), "--no-validate", "-q"])
    assert code == 3, stderr
    assert f"{src / WEIGHTS}: the file changed while it was being read" in stderr
    assert not out.exists() and _leftovers(tmp_path, "ckpt") == []


def test_a_tensor_problem_in_a_sharded_source_names_its_shard(tiny, tiny_tensors, tmp_path):
    """'names the file and tensor': the shard holding it, not the index."""
    bad = dict(tiny_tensors, **{"decoder.conv_in.conv.bias": np.full_like(tiny_tensors["decoder.conv_in.conv.bias"],
                                                                         np.inf)})
    src, weight_map = _sharded(tmp_path, tiny, bad)
    code, _, stderr = _run([str(src), "--out", str(tmp_path / "ckpt"), "-q"])
    shard = src / weight_map["decoder.conv_in.conv.bias"]
    assert code == 3 and f"  - {shard}: tensor 'decoder.conv_in.conv.bias': contains non-finite values" in stderr


def test_sharded_input(tiny, tiny_tensors, tmp_path):
    src, _ = _sharded(tmp_path, tiny, tiny_tensors)
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(src), "--out", str(out), "--no-validate", "-q"])
    assert code == 0, stderr
    _, params, _ = read_checkpoint(out)
    np.testing.assert_array_equal(params["encoder.conv_out.conv.bias"], tiny_tensors["encoder.conv_out.conv.bias"])
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["source"]["files"]) == 5  # config, index, 3 shards


def test_pipeline_folder(tiny, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline", "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(pipe), "--out", str(out), "--no-validate", "-q", "--format", "msgpack"])
    assert code == 0, stderr
    assert load(out, format="msgpack").config.block_out_channels == (8, 16, 16, 16)


def test_overwrite_replaces_atomically(tiny, tmp_path):
    out = tmp_path / "ckpt"
    assert _run([str(tiny), "--out", str(out), "--no-validate", "-q", "--format", "msgpack"])[0] == 0
    code, _, stderr = _run([str(tiny), "--out", str(out), "--no-validate", "-q", "--format", "orbax"])
    assert code == 4 and "already exists" in stderr
    assert (out / "params.msgpack").exists()
    code, _, stderr = _run([str(tiny), "--out", str(out), "--no-validate", "-q", "--format", "orbax", "--overwrite"])
    assert code == 0, stderr
    assert (out / "orbax").is_dir() and not (out / "params.msgpack").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("case", ["vae_folder", "pipeline_root", "project_folder", "run_with_orbax_dir",
                                  "folder_with_provenance", "folder_with_a_manifest_name",
                                  "checkpoint_plus_a_user_file", "checkpoint_plus_orbax_step"])
def test_overwrite_never_replaces_a_folder_that_is_not_a_checkpoint(tiny, tmp_path, case):
    """--overwrite deletes the old output: it must only ever delete a checkpoint (or an empty
    folder), never the source being converted, its pipeline, or any other folder of the user's:
    not one that merely holds a file or folder of a checkpoint's name (a training run's orbax/),
    nor a checkpoint folder a user added files to (every file must be listed by its manifest)."""
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    (pipe / "transformer").mkdir()
    (pipe / "transformer" / "weights.bin").write_bytes(b"x")
    run = tmp_path / "run"
    if case == "run_with_orbax_dir":
        (run / "orbax" / "step_1000").mkdir(parents=True)
        (run / "orbax" / "step_1000" / "x").write_bytes(b"w")
    elif case in ("folder_with_provenance", "folder_with_a_manifest_name"):
        run.mkdir()
        (run / ("provenance.json" if case == "folder_with_provenance" else "COMPLETE")).write_text("{}")
    elif case.startswith("checkpoint_plus"):
        assert _run([str(tiny), "--out", str(run), "--no-validate", "-q"])[0] == 0
        extra = run / ("notes.txt" if case == "checkpoint_plus_a_user_file" else "orbax/step_1000/x")
        extra.parent.mkdir(parents=True, exist_ok=True)
        extra.write_bytes(b"mine")
    if run.exists() and not case.startswith("checkpoint"):
        (run / "thesis.tex").write_text("months of work")
    src, out = {"vae_folder": (pipe / "vae", pipe / "vae"), "pipeline_root": (pipe, pipe),
                "project_folder": (pipe / "vae", pipe / "transformer")}.get(case, (pipe / "vae", run))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, stderr = _run([str(src), "--out", str(out), "--no-validate", "-q", "--overwrite"])
    assert code == 4
    assert "is not a cogvae checkpoint" in stderr and "--overwrite only replaces" in stderr
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_diffusers_folder_holding_a_provenance_json_is_still_a_diffusers_folder(tiny, tmp_path):
    """Other tools write a provenance.json too: diffusers' from_pretrained loads such a folder, and
    so must cogvae (only a manifest, orbax/, params.msgpack or a conversion's owner file make a
    folder a cogvae checkpoint)."""
    from cogvae.converter import load

    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    (src / "provenance.json").write_text(json.dumps({"downloaded_from": "THUDM/CogVideoX-2b"}))
    code, _, stderr = _run([str(src), "--out", str(tmp_path / "ckpt"), "--no-validate", "-q", "--format", "msgpack"])
    assert code == 0, stderr
    assert load(src).config == load(tmp_path / "ckpt").config


def test_output_folder_that_is_the_source_is_refused(tiny, tmp_path):
    """An empty --out that a folder source lies in (here: a pipeline whose VAE is found in it)
    would replace what is being read; refused before anything is written."""
    from cogvae.converter.checkpoint import OutputError, check_not_source

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny, pipe / "vae")
    with pytest.raises(OutputError, match="contains the source"):
        check_not_source(pipe, pipe / "vae")
    with pytest.raises(OutputError, match="is the source"):
        check_not_source(pipe / "vae", pipe / "vae")
    check_not_source(pipe / "vae" / "ckpt", pipe / "vae")  # an output inside the source is fine


def test_overwrite_replaces_an_empty_folder(tiny, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    code, _, stderr = _run([str(tiny), "--out", str(out), "--no-validate", "-q", "--format", "msgpack", "--overwrite"])
    assert code == 0, stderr
    assert is_converted_checkpoint(out)


def test_too_little_disk_space_is_an_output_error_before_writing(tiny, tmp_path, monkeypatch):
    """Faked, and why: a full disk cannot be made here, so shutil.disk_usage reports 1 KB free."""
    import cogvae.converter.checkpoint as ck

    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**6, used=10**6, free=1000))
    out = tmp_path / "ckpt"
    code, _, stderr = _run([str(tiny), "--out", str(out), "--no-validate", "-q"])
    assert code == 4
    assert stderr.strip().startswith(f"Error: {out}: cannot write checkpoint: No space left on device: the checkpoint needs ")
    # in a unit that shows the figure (this said "0.00 GB free")
    assert " MB, 1.0 kB free at " in stderr and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_a_failed_write_is_an_output_error(tmp_path, fmt):
    """The disk filling up while the checkpoint is written (here: a 40 KiB file-size limit on the
    process, RLIMIT_FSIZE, which makes writes fail with EFBIG as ENOSPC would; Python ignores the
    SIGXFSZ it also raises): exit 4 with one Error line, and nothing left at --out. (Orbax's writer
    threads also print tracebacks of their own, before or after that line: tensorstore callbacks
    that still arrive after Orbax closed its event loop; they come from orbax, not from cogvae.)
    The limit is below the tiny VAE's largest tensor (55 KB), which one Orbax data file must hold:
    how OCDBT spreads the tensors over data files depends on when its writes flush, and under load
    every file of the 0.9 MB checkpoint stayed below the 300 KiB this test once used (exit 0)."""
    out = tmp_path / "ckpt"
    p = subprocess.run(["bash", "-c", 'ulimit -f 40 && exec "$@"', "limit", CONVERT_EXE, "--out", str(out), "-q",
                        "--no-validate", "--format", fmt], capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 4, p.stderr
    # (their lines can interleave with cogvae's, so the message is found, not parsed line by line)
    assert p.stderr.count(f"Error: {out}: cannot write checkpoint: File too large\n") == 1
    if fmt == "msgpack":
        assert p.stderr == f"Error: {out}: cannot write checkpoint: File too large\n"
    assert sorted(q.name for q in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# the installed entry point
# ----------------------------------------------------------------------------------------


def test_subprocess_default_source_offline(tmp_path):
    out = tmp_path / "ckpt"
    code, stdout, stderr = _sub(["--out", str(out), "--json"])
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["source"] == "cogvae:tiny-cogvideox-vae" and summary["validation"]["ok"]
    assert is_converted_checkpoint(out)
    vae = load(out)
    import jax.numpy as jnp

    y = vae.decode(jnp.zeros((1, 1, 2, 2, 16)))
    assert y.shape == (1, 1, 16, 16, 3) and bool(jnp.isfinite(y).all())


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_subprocess_formats_and_exit_codes(tiny, tmp_path, fmt):
    out = tmp_path / "ckpt"
    code, _, stderr = _sub([str(tiny), "--out", str(out), "--format", fmt, "--no-validate", "--dtype", "bfloat16"])
    assert code == 0, stderr
    _, params, info = read_checkpoint(out)
    assert info["formats"] == [fmt] and {a.dtype.name for a in params.values()} == {"bfloat16"}
    code, _, stderr = _sub([str(tiny), "--out", str(out), "--no-validate"])
    assert code == 4
    assert stderr.strip().splitlines()[-1].startswith("Error: ") and "already exists" in stderr
    code, _, stderr = _sub([str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert code == 3 and "missing" in stderr
    code, _, stderr = _sub(["--format", "zip"])
    assert code == 2


def test_killed_mid_write_leaves_nothing_loadable(tiny, tmp_path):
    out = tmp_path / "ckpt"
    p = subprocess.Popen([CONVERT_EXE, str(tiny), "--out", str(out), "--no-validate", "-q"],
                         env=_env(COGVAE_TEST_SLOW_WRITE="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        tmp_dir = None
        while time.time() < deadline and p.poll() is None:  # wait until it is writing files
            left = _leftovers(tmp_path, "ckpt")
            if left and (tmp_path / left[0] / "config.json").exists():
                tmp_dir = tmp_path / left[0]
                break
            time.sleep(0.05)
        assert tmp_dir is not None, "the converter never started writing"
        time.sleep(2.5)  # inside the slow write: some files are there, not all
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    assert not is_converted_checkpoint(tmp_dir)
    for target in (out, tmp_dir):
        with pytest.raises((CheckpointError, FileNotFoundError)):
            load(target)
    with pytest.raises(CheckpointError, match="incomplete"):
        load(tmp_dir)
    # The next conversion to the same place removes the dead process's leftover and succeeds.
    code, _, stderr = _sub([str(tiny), "--out", str(out), "--no-validate", "-q"])
    assert code == 0, stderr
    assert not tmp_dir.exists()
    assert _leftovers(tmp_path, "ckpt") == []
    assert is_converted_checkpoint(out)


def test_folder_killed_before_any_parameter_file_reads_as_interrupted(tiny, tmp_path):
    """The earliest a conversion can be killed after creating its folder: only the owner file and
    config.json exist. load must call it an interrupted conversion, not try it as a diffusers folder."""
    from cogvae.converter.checkpoint import OWNER_FILE

    d = tmp_path / ".ckpt.tmp-early"
    d.mkdir()
    (d / OWNER_FILE).write_text("somehost 1\n")
    shutil.copy(tiny / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match="incomplete or not a cogvae checkpoint: no COMPLETE manifest"):
        load(d)


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------


def _truncated(tmp_path, tiny):
    d = _copy_with(tmp_path, tiny)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    return d, ["truncated", WEIGHTS]


def _garbage_header(tmp_path, tiny):
    d = _copy_with(tmp_path, tiny)
    data = bytearray((d / WEIGHTS).read_bytes())
    data[8:40] = b"\xff\xfe not json at all !!! \x00\x01\x02\x03\x04\x05\x06\x07"[:32]
    (d / WEIGHTS).write_bytes(bytes(data))
    return d, ["garbage", WEIGHTS]


def _config_mismatch(tmp_path, tiny):
    return _copy_with(tmp_path, tiny, config={"block_out_channels": [8, 16, 16, 32]}), ["shape mismatch", "problem(s)"]


def _other_class(tmp_path, tiny):
    return _copy_with(tmp_path, tiny, config={"_class_name": "AutoencoderKL"}), ["not a CogVideoX VAE", "config.json"]


def _unknown_key(tmp_path, tiny):
    return _copy_with(tmp_path, tiny, config={"mid_block_add_attention": True}), ["unknown config key"]


def _missing_folder(tmp_path, tiny):
    return tmp_path / "does-not-exist", ["does-not-exist"]


def _no_weights(tmp_path, tiny):
    d = _copy_with(tmp_path, tiny)
    (d / WEIGHTS).unlink()
    return d, ["no diffusion_pytorch_model"]


def _missing_tensor(tmp_path, tiny):
    t = open_safetensors(tiny / WEIGHTS)
    tensors = {k: np.array(t[k]) for k in t if k != "decoder.conv_out.conv.weight"}
    return _copy_with(tmp_path, tiny, tensors=tensors), ["missing tensor", "decoder.conv_out.conv.kernel"]


@pytest.mark.parametrize("make", [_truncated, _garbage_header, _config_mismatch, _other_class, _unknown_key,
                                  _missing_folder, _no_weights, _missing_tensor])
def test_bad_source_exit_3(tiny, tmp_path, make):
    src, needles = make(tmp_path, tiny)
    out = tmp_path / "ckpt"
    code, stdout, stderr = _run([str(src), "--out", str(out), "-q"])
    assert code == 3, stderr
    first = stderr.strip().splitlines()[0]
    assert first.startswith("Error: ")
    for n in needles:
        assert n in stderr
    assert not out.exists() and _leftovers(tmp_path, "ckpt") == []


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_exit_4(tiny, tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub"
    else:
        out = Path("/proc/cogvae-test-out")
    code, _, stderr = _run([str(tiny), "--out", str(out), "--no-validate", "-q"])
    assert code == 4, stderr
    assert stderr.startswith("Error: ") and str(out) in stderr and len(stderr.strip().splitlines()) == 1


def test_checkpoint_corruption_detected(tiny, tmp_path):
    out = tmp_path / "ckpt"
    assert _run([str(tiny), "--out", str(out), "--no-validate", "-q"])[0] == 0
    mp = out / "params.msgpack"
    data = bytearray(mp.read_bytes())
    data[-10] ^= 0xFF
    mp.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(out, format="msgpack")
    read_checkpoint(out, format="orbax")  # the other format is intact
    mp.write_bytes(bytes(data[:100]))
    assert not is_converted_checkpoint(out)
    (out / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no COMPLETE"):
        load(out)
    assert CliRunner().invoke(cli, ["export-diffusers", str(out), "--out", str(tmp_path / "x")]).exit_code == 3


# ----------------------------------------------------------------------------------------
# export, inspect, verify, push
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_export_diffusers_roundtrip(tiny, tiny_tensors, tmp_path, dtype):
    out = tmp_path / "ckpt"
    args = [str(tiny), "--out", str(out), "--no-validate", "-q"] + (["--dtype", dtype] if dtype else [])
    assert _run(args)[0] == 0
    exp = tmp_path / "exported"
    r = CliRunner().invoke(cli, ["export-diffusers", str(out), "--out", str(exp), "--format", "msgpack"])
    assert r.exit_code == 0, r.stderr
    back = open_safetensors(exp / WEIGHTS)
    assert sorted(back) == sorted(tiny_tensors)
    for k, v in tiny_tensors.items():
        want = v if dtype is None else v.astype(ml_dtypes.bfloat16)
        assert back[k].dtype == want.dtype and back[k].shape == want.shape
        assert back[k].tobytes() == want.tobytes(), k
    r = CliRunner().invoke(cli, ["export-diffusers", str(out), "--out", str(exp)])
    assert r.exit_code == 4
    # --overwrite replaces an earlier export, never a folder holding anything else (the checkpoint)
    r = CliRunner().invoke(cli, ["export-diffusers", str(out), "--out", str(exp), "--overwrite"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(cli, ["export-diffusers", str(out), "--out", str(out), "--overwrite"])
    assert r.exit_code == 4 and "is not a diffusers model folder" in r.stderr and is_converted_checkpoint(out)
    if dtype is None:
        import torch
        from diffusers import AutoencoderKLCogVideoX

        model = AutoencoderKLCogVideoX.from_pretrained(exp)
        sd = model.state_dict()
        for k, v in tiny_tensors.items():
            assert torch.equal(sd[k], torch.from_numpy(v)), k


def test_inspect_lists_every_tensor_then_exits_3_naming_what_convert_would_refuse(tiny, tiny_tensors, tmp_path):
    """A tensor of the wrong rank, one of the wrong shape, a key no rule matches, a needed tensor
    the file lacks, and tensors of a dtype convert refuses (in the header, so no values are read):
    all listed (the listing is complete), each named on stderr, exit 3 as cogvae-convert would
    exit for this source."""
    tensors = {**tiny_tensors, "decoder.conv_in.conv.weight": np.zeros((16, 16, 3, 3), np.float32),
               "encoder.conv_in.conv.bias": np.zeros(7, np.float32), "foo.bar": np.zeros(3, np.float32),
               "decoder.norm_out.norm_layer.bias": tiny_tensors["decoder.norm_out.norm_layer.bias"].astype(np.int32),
               "encoder.conv_out.conv.bias": tiny_tensors["encoder.conv_out.conv.bias"].astype(np.float64)}
    del tensors["decoder.conv_out.conv.bias"]
    src = _copy_with(tmp_path, tiny, tensors=tensors)
    r = CliRunner().invoke(cli, ["inspect", str(src), "--json"])
    assert r.exit_code == 3, r.stderr
    data = json.loads(r.stdout)
    assert data["num_tensors"] == len(tensors) == len(data["tensors"])
    row = next(x for x in data["tensors"] if x["key"] == "decoder.conv_in.conv.weight")
    assert row["target_shape"] is None and "rank" in row["problem"]
    f = src / "diffusion_pytorch_model.safetensors"  # each problem names the file, as convert's do
    assert data["problems"] == [
        f"{f}: tensor 'decoder.conv_in.conv.weight': {row['problem']}",
        f"{f}: tensor 'decoder.norm_out.norm_layer.bias': dtype int32 is not floating point (allowed: bfloat16, "
        "float16, float32)",
        f"{f}: tensor 'encoder.conv_in.conv.bias': shape mismatch: source shape (7,), expected (8,) (model parameter "
        "'encoder.conv_in.conv.bias' has shape (8,))",
        f"{f}: tensor 'encoder.conv_out.conv.bias': dtype float64 not allowed (allowed: bfloat16, float16, float32); "
        "cogvae-convert --dtype float32 casts it",
        f"{f}: tensor 'foo.bar': no mapping rule matches this key",
        f"{f}: missing tensor for model parameter 'decoder.conv_out.conv.bias' (3,) (expected source key "
        "'decoder.conv_out.conv.bias')",
    ]
    r = CliRunner().invoke(cli, ["inspect", str(src)])
    assert r.exit_code == 3
    assert "decoder.conv_in.conv.weight  ->  decoder.conv_in.conv.kernel" in r.stdout and "PROBLEM: " in r.stdout
    assert "foo.bar  ->  -  [NO RULE]" in r.stdout
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"Error: {src / 'diffusion_pytorch_model.safetensors'}: 6 problem(s) that cogvae-convert would refuse:"
    assert lines[1:] == [f"  - {p}" for p in data["problems"]]
    assert _run([str(src), "--out", str(tmp_path / "ckpt"), "-q"])[0] == 3  # and convert does refuse it


def test_inspect(tiny, tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(tiny), "--json"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kind"] == "diffusers" and data["num_tensors"] == 240 and data["problems"] == []
    row = next(x for x in data["tensors"] if x["key"] == "decoder.conv_in.conv.weight")
    assert row["target"] == "decoder.conv_in.conv.kernel" and row["rule"]
    assert row["shape"] == [16, 16, 3, 3, 3] and row["target_shape"] == [3, 3, 3, 16, 16] and row["dtype"] == "float32"
    out = tmp_path / "ckpt"
    assert _run([str(tiny), "--out", str(out), "--no-validate", "-q"])[0] == 0
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0
    assert "decoder.conv_in.conv.kernel  ->  decoder.conv_in.conv.weight" in r.stdout
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope")])
    assert r.exit_code == 3 and r.stderr.startswith("Error: ")


def test_verify_and_push_wiring(tiny, tmp_path):
    out = tmp_path / "ckpt"
    assert _run([str(tiny), "--out", str(out), "--no-validate", "-q"])[0] == 0
    r = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    r = CliRunner().invoke(cli, ["push", str(out), "me/tiny-vae-jax", "--dry-run", "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["dry_run"] and any(f["path"] == "COMPLETE" for f in res["files"])


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["export-diffusers", "--help"],
                                  ["inspect", "--help"], ["verify", "--help"], ["push", "--help"]])
def test_help_has_examples_and_exit_codes(argv):
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 0
    assert "Examples:" in r.stdout and "Exit codes:" in r.stdout
    r = CliRunner().invoke(convert_command, ["--help"])
    assert "cogvae-convert THUDM/CogVideoX-2b --out ckpt/" in r.stdout and "5  network" in r.stdout


def test_push_flags_need_push_to_hub(tiny, tmp_path):
    code, _, stderr = _run([str(tiny), "--out", str(tmp_path / "o"), "--dry-run"])
    assert code == 2


# ----------------------------------------------------------------------------------------
# full size
# ----------------------------------------------------------------------------------------


def test_full_size_default_config(tmp_path):
    """diffusers' default AutoencoderKLCogVideoX (the CogVideoX-2b architecture, ~862 MB fp32)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    src = tmp_path / "full"
    with torch.no_grad():
        AutoencoderKLCogVideoX().save_pretrained(src, safe_serialization=True)
    out = tmp_path / "ckpt"
    code, stdout, stderr = _sub([str(src), "--out", str(out), "--no-validate", "--format", "msgpack", "--json"])
    assert code == 0, stderr
    s = json.loads(stdout)
    assert s["bytes"] > 800e6 and s["num_tensors"] == len(open_safetensors(src / WEIGHTS))
    config, params, _ = read_checkpoint(out, verify=False)
    assert config.block_out_channels == (128, 256, 256, 512)
    w = open_safetensors(src / WEIGHTS)["decoder.conv_out.conv.weight"]
    np.testing.assert_array_equal(params["decoder.conv_out.conv.kernel"], np.asarray(w).transpose(2, 3, 4, 1, 0))


@pytest.mark.parametrize("revision", ["main", ""])
def test_revision_without_source_is_a_usage_error(tmp_path, monkeypatch, revision):
    """`cogvae-convert --revision R` with no SOURCE (the embedded VAE has no revisions) is a usage
    error (exit 2) found before any work, not a bad source (exit 3).
    Faked, and why: convert's output step is replaced by a function that fails the test, to prove
    the combination is refused before it (nothing touches the network: there is no Hub source)."""
    import cogvae.converter.convert as convert_mod

    monkeypatch.setattr(convert_mod, "atomic_output_dir", lambda *a, **k: pytest.fail("convert was called"))
    r = CliRunner().invoke(convert_command, ["--revision", revision, "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2, r.output
    assert r.stdout == "" and "Error: --revision needs a Hub SOURCE" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["non-utf8", "deep"])
@pytest.mark.parametrize("where,command", [
    ("config.json", "convert"), ("config.json", "inspect"),       # a diffusers source's config
    ("COMPLETE", "inspect"), ("COMPLETE", "export-diffusers"),    # a checkpoint's manifest
    ("COMPLETE", "verify")])
def test_a_json_file_that_is_not_utf8_or_too_deep_is_one_error_line(tiny, written, tmp_path, where, content,
                                                                    command):
    """A stray Latin-1 byte, or JSON nested deeper than Python's parser recurses, in a file cogvae
    reads: one 'Error:' line naming the file and exit 3 (verify: a failed check naming it, exit
    1), no traceback (UnicodeDecodeError and RecursionError are not JSON decode errors)."""
    from cogvae.converter.cli import cli

    folder = tmp_path / "in"
    shutil.copytree(tiny if where == "config.json" else written[0], folder)
    f = folder / where
    if content == "non-utf8":
        f.write_bytes(f.read_bytes().replace(b'"', b'"caf\xe9 ', 1))
    else:
        f.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    args = {"convert": ["convert", str(folder), "--out", str(tmp_path / "out"), "-q"],
            "inspect": ["inspect", str(folder)],
            "export-diffusers": ["export-diffusers", str(folder), "--out", str(tmp_path / "out")],
            "verify": ["verify", str(folder), "--no-parity"]}[command]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    expected = "not UTF-8 text (byte 0xe9" if content == "non-utf8" else "JSON nested too deeply to read"
    assert expected in r.output and str(f) in r.output, r.output
    assert r.exit_code == (1 if command == "verify" else 3) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["convert", "load", "verify", "inspect"])
def test_an_unknown_config_key_and_bad_tensors_are_reported_together(tiny, tiny_tensors, tmp_path, entry):
    """An unknown config key leaves the architecture known: the weights are still checked against
    it, and the key, an unmapped tensor, a NaN, a wrong shape and a missing tensor are named in one
    error (not one per run, each hiding the next)."""
    from cogvae.converter.engine import ConversionError
    from cogvae.converter.verify import verify_checkpoint

    bad = dict(tiny_tensors)
    bad["decoder.extra_thing.weight"] = np.ones(3, np.float32)
    bad["decoder.conv_in.conv.bias"] = np.full_like(bad["decoder.conv_in.conv.bias"], np.nan)
    bad["encoder.conv_in.conv.bias"] = np.zeros(99, np.float32)
    del bad["decoder.conv_out.conv.weight"]
    src = _copy_with(tmp_path, tiny, config={"bogus_field": 1}, tensors=bad)
    expected = ["config.json: unknown config key 'bogus_field'", "'decoder.extra_thing.weight': matches no rule",
                "'decoder.conv_in.conv.bias': contains non-finite values", "'encoder.conv_in.conv.bias': shape mismatch",
                "missing tensor for model parameter 'decoder.conv_out.conv.kernel'"]
    if entry == "convert":
        code, _, stderr = _run([str(src), "--out", str(tmp_path / "out"), "-q"])
        assert code == 3 and stderr.startswith("Error: cannot convert") and "5 problem(s)" in stderr, stderr
        message = stderr
        assert not (tmp_path / "out").exists()
    elif entry == "load":
        with pytest.raises(ConversionError) as e:
            load(src)
        message = str(e.value)
    elif entry == "inspect":  # reads no values: every problem but the NaN
        r = CliRunner().invoke(cli, ["inspect", str(src)])
        assert r.exit_code == 3 and "4 problem(s) that cogvae-convert would refuse" in r.stderr, r.output
        message = r.stderr
        expected = ["config.json: unknown config key 'bogus_field'", "tensor 'decoder.extra_thing.weight': no mapping rule",
                    "tensor 'encoder.conv_in.conv.bias': shape mismatch: source shape (99,), expected (8,)",
                    "missing tensor for model parameter 'decoder.conv_out.conv.kernel'"]
    else:  # verify's report has its own sections (load, architecture, finite)
        r = verify_checkpoint(src, parity=False)
        message = r.format_text()
        assert not r.ok and len(r.problems) == 5, r.problems
        expected = ["config.json: invalid CogVideoX VAE config: unknown config key 'bogus_field'",
                    "'decoder.extra_thing.weight': matches no rule", "decoder.conv_in.conv.bias: 16 NaN",
                    "shape: encoder.conv_in.conv.bias (99,), expected (8,)",
                    "missing: decoder.conv_out.conv.kernel (3, 3, 3, 8, 3)"]
    assert all(text in message for text in expected), message


def test_an_unknown_config_key_alone_is_still_refused(tiny, tmp_path):
    src = _copy_with(tmp_path, tiny, config={"bogus_field": 1})
    code, _, stderr = _run([str(src), "--out", str(tmp_path / "out"), "-q"])
    assert code == 3 and stderr.strip() == f"Error: {src / 'config.json'}: invalid CogVideoX VAE config: unknown config " \
                                           "key 'bogus_field'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ckpt, message", [("missing", "no such checkpoint folder"),
                                           ("diffusers", "not a cogvae checkpoint: no COMPLETE manifest")])
def test_export_of_what_is_not_a_checkpoint_names_the_input_even_with_out_beneath_it(tiny, tmp_path, ckpt,
                                                                                       message):
    """The input's problem comes first (exit 3): an --out inside a folder that is not a checkpoint
    is not 'inside the checkpoint it comes from' (exit 4)."""
    folder = tmp_path / "missing" if ckpt == "missing" else tiny
    r = CliRunner().invoke(cli, ["export-diffusers", str(folder), "--out", str(folder / "exported")])
    assert r.exit_code == 3 and message in r.stderr and "inside the checkpoint" not in r.stderr, r.output
    assert not (folder / "exported").exists()
