"""A converted checkpoint is trusted only as far as its COMPLETE manifest vouches for it: every
reader refuses a manifest that leaves files unchecked, files it does not list, parameters that
do not fit the config, and casts that overflow. Each case is a real checkpoint written by
``convert`` and then damaged on disk, as a bad copy, an edit or another tool would leave it."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cogvae.converter import load, save
from cogvae.converter.checkpoint import (
    CheckpointError,
    _manifest,
    _read_msgpack,
    _write_msgpack,
    is_converted_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from cogvae.converter.cli import cli
from cogvae.converter.convert import convert, default_source
from cogvae.converter.engine import ConversionError
from cogvae.converter.st_io import open_safetensors, save_safetensors
from cogvae.model import VAEConfig

BIAS = "encoder.conv_in.conv.bias"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "ckpt"
    convert(None, out, quiet=True, validate=False)
    return out


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    return d


def _edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "COMPLETE").read_text())
    edit(m)
    (folder / "COMPLETE").write_text(json.dumps(m))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_a_manifest_that_omits_a_formats_files_is_refused(ckpt, tmp_path, fmt):
    """Without their entries the format's files would go unchecked: a corrupted file loaded."""
    d = _copy(ckpt, tmp_path)
    prefix = "orbax/" if fmt == "orbax" else "params.msgpack"
    _edit_manifest(d, lambda m: m.__setitem__("files", {k: v for k, v in m["files"].items()
                                                        if not k.startswith(prefix)}))
    _flip_a_byte(_largest_file(d / "orbax") if fmt == "orbax" else d / "params.msgpack")
    with pytest.raises(CheckpointError, match=f"corrupt manifest: lists no {fmt} files, though its formats include"):
        load(d, format=fmt)
    assert not is_converted_checkpoint(d)


def test_a_file_in_the_orbax_folder_that_the_manifest_does_not_list_is_refused(ckpt, tmp_path):
    """Orbax reads what its folder holds, so an unlisted file there could change what loads."""
    d = _copy(ckpt, tmp_path)
    data = _largest_file(d / "orbax")
    _edit_manifest(d, lambda m: m["files"].pop(data.relative_to(d).as_posix()))
    with pytest.raises(CheckpointError, match=rf"{data.relative_to(d).as_posix()}: not in the COMPLETE manifest"):
        read_checkpoint(d, format="orbax")
    read_checkpoint(d, format="msgpack")  # the other format is still sound


@pytest.mark.parametrize("entry, message", [
    ("abc", r'config.json: entry "abc" is not'),
    ({"size": 10}, r"config.json: entry .* is not"),
    ({"size": -1, "sha256": "0" * 64}, r"config.json: entry .* is not"),
    ({"size": True, "sha256": "0" * 64}, r"config.json: entry .* is not"),
    ({"size": 10, "sha256": "xyz"}, r"config.json: entry .* is not"),
])
def test_a_malformed_manifest_entry_is_a_clear_error(ckpt, tmp_path, entry, message):
    d = _copy(ckpt, tmp_path)
    _edit_manifest(d, lambda m: m["files"].__setitem__("config.json", entry))
    with pytest.raises(CheckpointError, match="COMPLETE: corrupt manifest: " + message):
        read_checkpoint(d)
    assert not is_converted_checkpoint(d)
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert r.exit_code == 3 and r.stderr.startswith("Error: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("rel", ["../outside", "/etc/hostname", "orbax/../config.json", "a//b"])
def test_a_manifest_path_outside_the_folder_is_refused(ckpt, tmp_path, rel):
    d = _copy(ckpt, tmp_path)
    _edit_manifest(d, lambda m: m["files"].__setitem__(rel, {"size": 1, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="not a relative path inside the checkpoint folder"):
        read_checkpoint(d)


def test_several_corrupt_files_are_listed_one_per_line(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    (d / "config.json").write_text((d / "config.json").read_text() + " ")
    _flip_a_byte(d / "params.msgpack")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(d, format="msgpack")
    assert str(e.value).splitlines() == [
        f"{d}: corrupt checkpoint: 2 problems:",
        f"  - config.json: size {(d / 'config.json').stat().st_size}, manifest says "
        f"{(d / 'config.json').stat().st_size - 1}",
        "  - params.msgpack: sha256 differs from the manifest (corrupt file)"]


def _rewrite_params(folder: Path, change) -> None:
    """Replace params.msgpack and re-sign the manifest: a checkpoint whose hashes are all right but
    whose parameters another tool wrote."""
    params = _read_msgpack(folder / "params.msgpack")
    change(params)
    _write_msgpack(folder / "params.msgpack", params)
    manifest = _manifest(folder, ["msgpack"], {})
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("orbax/")}
    shutil.rmtree(folder / "orbax")
    (folder / "COMPLETE").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda p: p.__setitem__(BIAS, np.full_like(p[BIAS], np.nan)), "contains non-finite values: 8 NaN, 0 Inf"),
    (lambda p: p.__setitem__(BIAS, p[BIAS].astype(np.int32)), "dtype int32 is not floating point"),
    (lambda p: p.__setitem__(BIAS, p[BIAS].astype(np.float64)), "dtype float64 not allowed"),
])
def test_load_refuses_parameters_a_checkpoint_may_not_hold(ckpt, tmp_path, change, message):
    d = _copy(ckpt, tmp_path)
    _rewrite_params(d, change)
    assert is_converted_checkpoint(d)  # the files are what the manifest says
    with pytest.raises(CheckpointError, match=rf"parameter '{BIAS}': {message}"):
        load(d)


def _pack_tree(items) -> bytes:
    """msgpack of a map given as ``[(key, value)]``, in that order and duplicates kept (which a dict
    cannot express); a value is such a list again, or the packed bytes of a leaf."""
    import msgpack

    head = msgpack.Packer(use_bin_type=True).pack_map_header(len(items))
    return head + b"".join(msgpack.packb(k) + (_pack_tree(v) if isinstance(v, list) else v) for k, v in items)


def _leaf(a: np.ndarray, dtype_name: str | None = None, shape=None) -> bytes:
    """flax's ndarray extension, ``ExtType(1, (shape, dtype name, bytes))``, with any dtype name or shape."""
    import msgpack

    body = (list(a.shape if shape is None else shape), dtype_name or a.dtype.name, a.tobytes())
    return msgpack.packb(msgpack.ExtType(1, msgpack.packb(body, use_bin_type=True)))


def _items(node: dict) -> list:
    return [(k, _items(v) if isinstance(v, dict) else _leaf(v)) for k, v in sorted(node.items())]


def _rewrite_raw(folder: Path, edit) -> None:
    """params.msgpack rewritten as another tool's writer might (``edit`` changes the item tree of
    the checkpoint's parameters in place), the manifest re-signed, Orbax removed."""
    from cogvae.converter.checkpoint import nest

    tree = _items(nest(_read_msgpack(folder / "params.msgpack")))
    edit(tree)
    (folder / "params.msgpack").write_bytes(_pack_tree(tree))
    manifest = _manifest(folder, ["msgpack"], {})
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("orbax/")}
    shutil.rmtree(folder / "orbax")
    (folder / "COMPLETE").write_text(json.dumps(manifest))


def _bias_map(tree: list) -> list:
    """The item list of the map holding 'bias' under encoder.conv_in.conv."""
    for part in BIAS.split(".")[:-1]:
        tree = dict(tree)[part]
    return tree


def _replace_bias(tree: list, leaf: bytes) -> None:
    m = _bias_map(tree)
    m[[k for k, _ in m].index("bias")] = ("bias", leaf)


_BIAS8 = np.arange(8, dtype=np.float32)


@pytest.mark.parametrize("edit, message", [
    # flax would hand JAX a byte-swapped array, which it refuses without naming the tensor
    (lambda t: _replace_bias(t, _leaf(_BIAS8.astype(">f4"), ">f4")),
     rf"{BIAS}: dtype '>f4' is not in this machine's byte order"),
    (lambda t: _replace_bias(t, _leaf(_BIAS8, "float33")), rf"{BIAS}: unknown dtype 'float33'"),
    # a key twice in one map: flax keeps the last value silently, so which one a tensor has would
    # depend on the reader
    (lambda t: _bias_map(t).append(("bias", _leaf(_BIAS8 + 7))), rf"{BIAS}: key 'bias' appears more than once"),
    # a dotted key names another tensor's path a second time
    (lambda t: t.append((BIAS, _leaf(_BIAS8 + 7))), rf"{BIAS}: key '{BIAS}' is not a parameter name"),
    # a zero-size tensor of more dimensions than numpy has: was a traceback from reshape
    (lambda t: _replace_bias(t, _leaf(np.zeros(0, np.float32), shape=[0] * 70)),
     rf"{BIAS}: shape \[0, 0, .*\] cannot be read as an array \(maximum supported dimension"),
], ids=["byte-swapped", "unknown-dtype", "key-twice", "dotted-key", "70-dimensions"])
def test_a_msgpack_file_that_reads_two_ways_or_not_at_all_is_refused_by_every_reader(ckpt, tmp_path, edit, message):
    """Each leaf of params.msgpack must read one way, as an array JAX can hold: verify and inspect
    passed the first two (load then failed without naming the tensor) and the next two (load kept
    one of two values silently); the last was a traceback."""
    d = _copy(ckpt, tmp_path)
    _rewrite_raw(d, edit)
    assert is_converted_checkpoint(d)  # the files are what the manifest says
    with pytest.raises(CheckpointError, match=rf"params\.msgpack: cannot read msgpack parameters: ValueError: {message}"):
        load(d)
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert r.exit_code == 3 and re.search(message, r.output), r.output
    r = CliRunner().invoke(cli, ["verify", str(d), "--no-parity"])
    assert r.exit_code == 1 and re.search(message, r.output) and "RESULT: FAILED" in r.output, r.output
    r = CliRunner().invoke(cli, ["export-diffusers", str(d), "--out", str(tmp_path / "exported")])
    assert r.exit_code == 3 and re.search(message, r.output) and ".tmp-" not in r.output, r.output
    assert not (tmp_path / "exported").exists()


def test_write_checkpoint_refuses_every_bad_parameter_together(ckpt, tmp_path):
    config, params, _ = read_checkpoint(ckpt, format="msgpack")
    params[BIAS] = np.full_like(params[BIAS], np.inf)
    params["decoder.conv_out.conv.bias"] = params["decoder.conv_out.conv.bias"].astype(np.int32)
    del params["decoder.conv_in.conv.bias"]
    params["decoder.extra"] = np.zeros(3, np.float32)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        write_checkpoint(out, params, config)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{out}: parameters do not fit the config: 4 problem(s):"
    assert any("'decoder.extra'" in ln and "extra" in ln for ln in lines)
    assert any("'decoder.conv_in.conv.bias'" in ln and "missing" in ln for ln in lines)
    assert any("int32" in ln for ln in lines) and any("0 NaN, 8 Inf" in ln for ln in lines)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# casts that overflow: a finite float32 weight beyond float16's 65504
# ----------------------------------------------------------------------------------------


def _source_with_a_large_weight(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(default_source(), src)
    weights = src / "diffusion_pytorch_model.safetensors"
    f = open_safetensors(weights)
    tensors = {k: np.array(f[k]) for k in f}
    tensors[BIAS] = tensors[BIAS].copy()
    tensors[BIAS][3] = 1e5
    save_safetensors(tensors, weights, metadata={"format": "pt"})
    return src


OVERFLOW = r"does not fit float16: 1 of 8 finite values overflow to Inf when cast \(largest magnitude 100000"


def test_convert_to_float16_refuses_a_weight_that_overflows(tmp_path):
    src = _source_with_a_large_weight(tmp_path)
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(cli, ["convert", str(src), "--out", str(out), "--dtype", "float16", "-q"])
    assert r.exit_code == 3, r.output
    assert r.stderr.startswith("Error: ") and re.search(rf"{BIAS}.*{OVERFLOW}", r.stderr)
    assert not out.exists()
    r = CliRunner().invoke(cli, ["convert", str(src), "--out", str(out), "--dtype", "bfloat16", "-q", "--no-validate"])
    assert r.exit_code == 0, r.output  # bfloat16 holds float32's range


def test_save_and_load_as_float16_refuse_a_weight_that_overflows(tmp_path):
    src = _source_with_a_large_weight(tmp_path)
    vae = load(src)
    with pytest.raises(ConversionError, match=rf"parameter '{BIAS}': {OVERFLOW}"):
        save(vae, tmp_path / "ft", dtype="float16", validate=False)
    assert not (tmp_path / "ft").exists()
    save(vae, tmp_path / "ft32", validate=False)
    with pytest.raises(CheckpointError, match=rf"parameter '{BIAS}': {OVERFLOW}"):
        load(tmp_path / "ft32", dtype="float16")
    assert load(tmp_path / "ft32", dtype="bfloat16").config == VAEConfig.from_json_file(src / "config.json")


def test_a_decode_that_overflows_is_reported_as_such_not_as_differing_formats(ckpt, tmp_path):
    """Finite weights whose decode overflows (a bias of 3e38): both formats decode the same Inf;
    validation names that, and does not claim the two formats differ."""
    from cogvae.converter.convert import validate_checkpoint_dir

    config, params, _ = read_checkpoint(ckpt, format="msgpack")
    params["decoder.conv_out.conv.bias"] = np.full_like(params["decoder.conv_out.conv.bias"], 3e38)
    params["decoder.conv_out.conv.kernel"] = np.full_like(params["decoder.conv_out.conv.kernel"], 3e38)
    write_checkpoint(tmp_path / "big", params, config)
    v = validate_checkpoint_dir(tmp_path / "big", config, ("orbax", "msgpack"), None)
    assert v["formats_identical"] is True
    assert v["problems"] == ["orbax: decode output has NaN/Inf", "msgpack: decode output has NaN/Inf"]


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
@pytest.mark.parametrize("swaps", [1, 4])
def test_a_checkpoint_replaced_while_it_is_read_is_read_again_never_mixed(ckpt, tmp_path, monkeypatch, fmt, swaps):
    """--overwrite swaps a whole checkpoint folder in one rename, while a reader reads its files by
    path: hashes checked on one checkpoint, bytes read from the other. Faked, to make the race
    deterministic: read_format is wrapped so that a real write_checkpoint(overwrite=True) of a
    bfloat16 checkpoint lands just after the hashes were checked, on the first ``swaps`` reads.
    Once: the new checkpoint is read again, whole (its dtype, its manifest). Every time: refused."""
    import ml_dtypes

    import cogvae.converter.checkpoint as ck

    out = _copy(ckpt, tmp_path)
    config, params, _ = read_checkpoint(out)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    real, calls = ck.read_format, []

    def racing(folder, format, **kw):
        calls.append(format)
        if len(calls) <= swaps:
            write_checkpoint(out, bf16 if len(calls) % 2 else params, config, formats=("orbax", "msgpack"),
                             provenance={"source": "swap"}, overwrite=True)
        return real(folder, format, **kw)

    monkeypatch.setattr(ck, "read_format", racing)
    if swaps > ck.REPLACED_RETRIES:
        with pytest.raises(CheckpointError, match="replaced while it was being read, 4 times in a row"):
            read_checkpoint(out, format=fmt)
        return
    got_config, got, info = read_checkpoint(out, format=fmt)
    assert len(calls) == 2 and got_config == config
    assert {a.dtype.name for a in got.values()} == {"bfloat16"}  # the new checkpoint, read whole
    assert info["manifest"] == json.loads((out / "COMPLETE").read_text())
    for k, a in got.items():
        assert a.tobytes() == bf16[k].tobytes(), k


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_a_checkpoint_replaced_under_the_same_inode_is_read_again(ckpt, tmp_path, monkeypatch, fmt):
    """A checkpoint swapped out and deleted can be followed by a new folder under the very inode
    number the reader saw first (ext4 reuses freed inodes), so (device, inode) before and after
    did not show the swap: bytes of one checkpoint came back with the other's manifest. Faked, as
    the kernel's inode reuse cannot be forced: the new checkpoint's files are moved into the same
    folder (same inode, as a reused one would have) just after the hashes were checked. It is
    read again, whole."""
    import ml_dtypes

    import cogvae.converter.checkpoint as ck

    out = _copy(ckpt, tmp_path)
    config, params, _ = read_checkpoint(out)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    new = tmp_path / "new"
    write_checkpoint(new, bf16, config, formats=("orbax", "msgpack"), provenance={"source": "swap"})
    real, calls = ck.read_format, []
    inode = os.stat(out).st_ino

    def racing(folder, format, **kw):
        calls.append(format)
        if len(calls) == 1:
            for p in list(out.iterdir()):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            for p in new.iterdir():
                os.rename(p, out / p.name)
            assert os.stat(out).st_ino == inode
        return real(folder, format, **kw)

    monkeypatch.setattr(ck, "read_format", racing)
    _, got, info = read_checkpoint(out, format=fmt)
    assert len(calls) == 2
    assert info["manifest"] == json.loads((out / "COMPLETE").read_text())
    for k, a in got.items():
        assert a.tobytes() == bf16[k].tobytes(), k


def test_a_provenance_json_that_is_not_a_regular_file_is_not_read(ckpt, tmp_path):
    """provenance.json replaced by a FIFO: load used to block on reading it (it is informational:
    left out when it is not the regular file of the size its manifest lists). A thread writes
    to the FIFO after 30 s, so a regression fails here instead of hanging the suite."""
    import os
    import threading

    d = _copy(ckpt, tmp_path)
    (d / "provenance.json").unlink()
    os.mkfifo(d / "provenance.json")

    def unblock():
        fd = os.open(d / "provenance.json", os.O_WRONLY)
        os.write(fd, b'{"blocked": true}')
        os.close(fd)

    timer = threading.Timer(30, unblock)
    timer.daemon = True
    timer.start()
    try:
        _, _, info = read_checkpoint(d, format="msgpack")
        assert info["provenance"] == {}
        load(d, format="msgpack")
    finally:
        timer.cancel()


def test_unreadable_orbax_metadata_is_named(ckpt, tmp_path):
    """Orbax returns None for metadata it cannot read; that was a TypeError ('NoneType' object is
    not iterable). The manifest is redone for the damaged folder, as a tool rewriting files would."""
    d = _copy(ckpt, tmp_path)
    (d / "orbax" / "_METADATA").unlink()
    _edit_manifest(d, lambda m: m["files"].pop("orbax/_METADATA"))
    with pytest.raises(CheckpointError) as e:
        load(d, format="orbax")
    assert "cannot read the Orbax checkpoint's metadata" in str(e.value) and "NoneType" not in str(e.value)
    # In a real process (Orbax logs through absl to stderr): the Error line alone, without Orbax's
    # "Failed to get item metadata" warning before it
    import subprocess

    r = subprocess.run([sys.executable, "-c", "from cogvae.converter.cli import cli; cli()", "inspect", str(d)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert r.stderr == f"Error: {d}/orbax: cannot read the Orbax checkpoint's metadata (its _METADATA or OCDBT " \
                       "files are damaged or missing)\n", r.stderr


def test_inspect_refuses_a_checkpoint_whose_config_is_another_architecture(ckpt, tmp_path):
    """config.json edited to other block widths, the manifest redone: load and export-diffusers
    refuse it tensor by tensor; inspect listed it with no problem and exit 0."""
    import hashlib

    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["block_out_channels"] = [2 * c for c in cfg["block_out_channels"]]
    (d / "config.json").write_text(json.dumps(cfg))
    data = (d / "config.json").read_bytes()
    _edit_manifest(d, lambda m: m["files"].__setitem__("config.json", {
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    r = CliRunner().invoke(cli, ["inspect", str(d), "--json"])
    assert r.exit_code == 3, r.output
    problems = json.loads(r.stdout)["problems"]
    assert problems and all("the config's architecture has" in p or p.endswith(": missing") for p in problems)
    assert any("'decoder.conv_in.conv.bias': shape" in p for p in problems)
    with pytest.raises(CheckpointError) as e:  # the same lines load refuses it with
        load(d)
    assert [p for p in problems if p not in str(e.value)] == []


def test_load_takes_every_option_at_its_default_for_either_kind(ckpt):
    """load(diffusers folder, format=None / verify=True) was refused or a TypeError from an
    internal function; a default value is accepted for either kind, any other refused, named."""
    from cogvae.converter.hub import SourceError

    src = default_source()
    for kind in (src, ckpt):
        load(kind, format=None, verify=True, subfolder="vae", variant=None, mapping=None, compute_dtype=None)
    with pytest.raises(SourceError, match=r"not a converted cogvae checkpoint \(verify= applies to those only\)"):
        load(src, verify=False)
    with pytest.raises(TypeError, match=r"load\(mapping=...\): a cogvae.converter.mapping.Mapping"):
        load(src, mapping="x")
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtpye'") as e:
        load(src, dtpye="bfloat16")
    assert "load()" in str(e.value)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
def test_inspect_of_a_checkpoint_reads_shapes_and_dtypes_not_tensor_bytes(ckpt, tmp_path, monkeypatch, fmt):
    """inspect lists a checkpoint from its format's metadata: read_checkpoint(values=False) gives
    each parameter's shape and dtype as read_checkpoint gives the array, and inspect never reads
    the tensors (it read all of them: 1.1 GB of RSS for the full-size 2b checkpoint, 0.24 GB now).
    Faked: the readers of tensor bytes are wrapped to record any call."""
    import cogvae.converter.checkpoint as ck

    d = _copy(ckpt, tmp_path)
    _, params, _ = read_checkpoint(d, format=fmt)
    _, metas, info = read_checkpoint(d, format=fmt, values=False)
    assert info["format"] == fmt
    assert {k: (m.shape, m.dtype) for k, m in metas.items()} == {k: (a.shape, a.dtype) for k, a in params.items()}
    reads = []
    for name in ("read_format", "iter_format", "_sha256"):
        real = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda *a, _real=real, _name=name, **k: (reads.append(_name), _real(*a, **k))[1])
    if fmt == "msgpack":
        shutil.rmtree(d / "orbax")
        _edit_manifest(d, lambda m: (m.__setitem__("formats", ["msgpack"]),
                                     [m["files"].pop(f) for f in list(m["files"]) if f.startswith("orbax/")]))
    r = CliRunner().invoke(cli, ["inspect", str(d), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {x["key"]: (tuple(x["shape"]), x["dtype"]) for x in data["tensors"]} == \
        {k: (a.shape, a.dtype.name) for k, a in params.items()}
    assert reads == []


def test_only_late_reads_for_a_closed_event_loop_are_kept_off_stderr(monkeypatch):
    """A failed Orbax read (a checkpoint replaced mid-read, read again) closes its event loop while
    tensorstore still completes the other reads: each calls ``loop.call_soon_threadsafe`` from a
    native thread and Python prints "RuntimeError: Event loop is closed" as an unraisable
    exception, hundreds of times per retried read. Those are dropped; every other unraisable
    exception still reaches the previous hook. Faked: the native caller, by passing the hook the
    exception a closed loop really raises (its traceback from call_soon_threadsafe on, as a call
    from C has no Python frame above it)."""
    import asyncio
    import types

    import cogvae.converter.checkpoint as ck

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ck._drop_late_callbacks_on_closed_loops()
    ck._drop_late_callbacks_on_closed_loops()  # installed once: the hook is not wrapped twice
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = e
    unraisable = types.SimpleNamespace(exc_type=RuntimeError, exc_value=late, exc_traceback=late.__traceback__.tb_next,
                                       err_msg=None, object=None)
    sys.unraisablehook(unraisable)
    assert seen == []
    other = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("boom"), exc_traceback=None,
                                  err_msg=None, object=None)
    from_python = types.SimpleNamespace(**{**vars(unraisable), "exc_traceback": late.__traceback__})
    sys.unraisablehook(other)
    sys.unraisablehook(from_python)  # raised under a Python caller: not the native callback, kept
    assert seen == [other, from_python]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_without_reading_it(ckpt, tmp_path, kind):
    """COMPLETE as a FIFO or a link to /dev/zero: the check for a checkpoint replaced mid-read
    hashed the manifest before anything checked it is a regular file, so read_checkpoint, inspect
    and verify blocked on the FIFO or read /dev/zero without end. They refuse it at once: "no
    COMPLETE manifest". A thread writes to the FIFO after 30 s, so a regression fails here
    instead of hanging the suite."""
    import threading

    d = _copy(ckpt, tmp_path)
    (d / "COMPLETE").unlink()
    if kind == "fifo":
        os.mkfifo(d / "COMPLETE")
    else:
        os.symlink("/dev/zero", d / "COMPLETE")
    blocked = []

    def unblock():
        blocked.append(True)
        fd = os.open(d / "COMPLETE", os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"{}")
        os.close(fd)

    timer = threading.Timer(30, unblock) if kind == "fifo" else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        with pytest.raises(CheckpointError, match="no COMPLETE manifest"):
            read_checkpoint(d)
        r = CliRunner().invoke(cli, ["inspect", str(d)])
        assert r.exit_code == 3 and "no COMPLETE manifest" in r.stderr, r.output
        r = CliRunner().invoke(cli, ["verify", str(d), "--no-parity"])
        assert r.exit_code == 1 and "no COMPLETE manifest" in r.output, r.output  # FAILED, as before
    finally:
        if timer:
            timer.cancel()
    assert blocked == []
