"""verify_checkpoint: architecture, dtypes, finiteness, change against a reference, parity.

Nothing is faked unless a test says so: checkpoints are written by the real
``checkpoint.write_checkpoint`` from a tiny VAE saved by diffusers' ``save_pretrained``, and the
parity check runs diffusers itself (torch, CPU). Corrupt checkpoints are made by altering the
parameters before they are written (so their manifests are valid and only the contents are bad).
"""

from __future__ import annotations

import json
import sys

import ml_dtypes
import numpy as np
import pytest

from _hubcache import make_checkpoint, save_tiny_vae
from cogvae.converter.st_io import open_safetensors, save_safetensors
from cogvae.converter.verify import verify_checkpoint

NAN_KEY = "encoder.conv_in.conv.kernel"
SHAPE_KEY = "decoder.conv_out.conv.bias"
MISSING_KEY = "encoder.norm_out.scale"
PERTURBED_KEY = "decoder.up_blocks.0.resnets.0.conv1.conv.kernel"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="module")
def vae(base):
    return save_tiny_vae(base / "vae")


@pytest.fixture(scope="module")
def good(base, vae):
    return make_checkpoint(base / "good", vae)


def _edited_copy(vae, folder, edit):
    """A copy of the diffusers folder ``vae`` with one NaN in NAN_KEY's source tensor, then ``edit``
    (in place on the tensors) applied."""
    folder.mkdir()
    (folder / "config.json").write_text((vae / "config.json").read_text())
    src = open_safetensors(vae / "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(src[k]) for k in src}
    tensors["encoder.conv_in.conv.weight"][0, 0, 0, 0, 0] = np.nan
    edit(tensors)
    save_safetensors(tensors, folder / "diffusion_pytorch_model.safetensors")
    return folder


def _strict_json(report) -> dict:
    return json.loads(json.dumps(report.to_dict(), allow_nan=False))


def test_good_checkpoint_passes_with_parity(good, vae):
    r = verify_checkpoint(good, vae)
    assert r.ok, r.format_text()
    assert r.source_kind == "converted checkpoint" and r.reference_kind == "diffusers folder"
    assert r.num_tensors == 152 and not r.model_missing and not r.model_extra and not r.model_shape_mismatch
    assert r.dtype_summary() == {"float32": 152}
    assert r.parity["status"] == "passed"
    assert r.parity["rel_l2"] <= 1e-5 and r.parity["max_abs"] <= 1e-4
    # both halves of the VAE, in the compiled path, over two frame batches each (caches carried);
    # this config has one temporal down/upsampling: 5 latents -> 9 frames, 17 frames -> 9 latents
    cases = {c["op"]: c for c in r.parity["cases"]}
    assert cases["decode"]["input_shape"] == [1, 5, 4, 4, 4] and cases["decode"]["output_shape"] == [1, 3, 9, 8, 8]
    assert cases["encode"]["input_shape"] == [1, 17, 32, 32, 3] and cases["encode"]["output_shape"] == [1, 8, 9, 16, 16]
    assert all(c["status"] == "passed" and c["rel_l2"] <= 1e-5 for c in cases.values())
    assert all(c["rel_change"] == 0.0 for c in r.changes) and len(r.changes) == 152
    d = _strict_json(r)
    assert d["ok"] is True and d["problems"] == [] and len(d["changes"]) == 152
    text = r.format_text()
    assert "every key and shape matches" in text and "PASSED" in text and text.endswith("RESULT: OK")


def test_a_model_that_cannot_encode_is_checked_on_decode(base):
    """layers_per_block=0 with unequal block_out_channels: diffusers builds it and decodes, but its
    encode fails (nothing changes conv_in's channels). verify's parity ran both encodes and ended
    in torch's traceback; now decode is compared and encode is skipped, saying why."""
    from _ref import diffusers_vae

    folder = base / "no-resnets"
    diffusers_vae(seed=3, block_out_channels=(8, 16), layers_per_block=0, norm_num_groups=4,
                  latent_channels=4).save_pretrained(folder, safe_serialization=True)
    r = verify_checkpoint(make_checkpoint(base / "no-resnets-ckpt", folder), folder)
    assert r.ok, r.format_text()
    cases = {c["op"]: c for c in r.parity["cases"]}
    assert cases["decode"]["status"] == "passed" and cases["decode"]["rel_l2"] <= 1e-5
    assert cases["encode"]["status"] == "skipped"
    assert cases["encode"]["reason"].startswith("this VAE cannot encode: with layers_per_block=0")
    assert "    encode of video (1, 17, 32, 32, 3): SKIPPED: this VAE cannot encode" in r.format_text()


def test_msgpack_format_and_diffusers_source(good, vae):
    r = verify_checkpoint(good, format="msgpack", parity=False)
    assert r.ok and r.source_detail == "msgpack format"
    assert r.parity == {"status": "skipped", "note": "parity check not requested"}
    r = verify_checkpoint(vae)  # a diffusers folder as the source: converted in memory, parity run
    assert r.ok, r.format_text()
    assert r.source_kind == "diffusers folder" and r.parity["status"] == "passed"


def _corrupt(params):
    params[NAN_KEY] = params[NAN_KEY].copy()
    params[NAN_KEY].reshape(-1)[:3] = np.nan
    params[NAN_KEY].reshape(-1)[3] = np.inf
    params[SHAPE_KEY] = np.zeros(7, np.float32)
    del params[MISSING_KEY]


def test_corrupted_checkpoint_lists_every_problem(base, vae):
    bad = make_checkpoint(base / "bad", vae, params_hook=_corrupt, formats=("msgpack",))
    r = verify_checkpoint(bad, vae)
    assert not r.ok
    assert r.model_missing == [{"key": MISSING_KEY, "shape": [16]}]
    assert r.model_shape_mismatch == [{"key": SHAPE_KEY, "shape": [7], "expected": [3]}]
    assert r.nonfinite == [{"key": NAN_KEY, "nan": 3, "inf": 1, "size": 3 * 3 * 3 * 3 * 8}]
    assert [m["key"] for m in r.reference_missing] == [MISSING_KEY]
    assert [m["key"] for m in r.reference_shape_mismatch] == [SHAPE_KEY]
    assert r.parity["note"] == ("parity check skipped: 2 tensor(s) missing, extra or of the wrong shape for the "
                                "model; 1 tensor(s) with NaN/Inf")
    problems = "\n".join(r.problems)
    for key in (NAN_KEY, SHAPE_KEY, MISSING_KEY):
        assert key in problems
    text = r.format_text()
    assert f"missing: {MISSING_KEY} (16,)" in text
    assert f"shape: {SHAPE_KEY} (7,), expected (3,)" in text
    assert f"{NAN_KEY}: 3 NaN, 1 Inf" in text
    assert text.endswith(f"RESULT: FAILED ({len(r.problems)} problem(s))")
    assert _strict_json(r)["ok"] is False


def test_corrupted_diffusers_folder_is_a_report_not_a_crash(base, vae):
    def edit(tensors):
        tensors["decoder.conv_out.conv.bias"] = np.zeros(5, np.float32)
        del tensors["encoder.norm_out.weight"]
        tensors["encoder.surprise.weight"] = np.zeros(2, np.float32)

    folder = _edited_copy(vae, base / "bad_vae", edit)

    r = verify_checkpoint(folder)
    assert not r.ok and r.source_kind == "diffusers folder"
    assert [m["key"] for m in r.model_missing] == [MISSING_KEY]
    assert [m["key"] for m in r.model_shape_mismatch] == [SHAPE_KEY]
    assert [d["key"] for d in r.nonfinite] == [NAN_KEY]
    assert any("'encoder.surprise.weight'" in p and "matches no rule" in p for p in r.load_problems)


def test_relative_change_puts_the_perturbed_tensor_first(base, vae, good, tmp_path):
    def perturb(params):
        rng = np.random.default_rng(0)
        params[PERTURBED_KEY] = params[PERTURBED_KEY] + 1e-2 * rng.standard_normal(params[PERTURBED_KEY].shape,
                                                                                  dtype=np.float32)

    changed = make_checkpoint(base / "perturbed", vae, params_hook=perturb, formats=("msgpack",))
    r = verify_checkpoint(changed, good, parity=False)  # a converted checkpoint as the reference
    assert r.ok  # changes are reported, not judged, without a tolerance
    assert r.reference_kind == "converted checkpoint"
    first, rest = r.changes[0], r.changes[1:]
    assert first["key"] == PERTURBED_KEY and 1e-3 < first["rel_change"] < 1.0 and first["max_abs"] > 0
    assert all(c["rel_change"] == 0.0 for c in rest)
    text = r.format_text()
    assert f"max {first['rel_change']:.3e} ({PERTURBED_KEY}); top 10 of 152:" in text
    assert text.index(PERTURBED_KEY) < text.index("max abs")
    assert len(_strict_json(r)["changes"]) == 152  # all of them in JSON

    strict = verify_checkpoint(changed, good, parity=False, max_rel_change=1e-6)
    assert not strict.ok and strict.over_tolerance == [PERTURBED_KEY]

    # the same from the command line: a tolerance gate for a fine-tune (exit 1), --top, --format
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    args = ["verify", str(changed), "--reference", str(good), "--no-parity", "--format", "msgpack"]
    r = CliRunner().invoke(cli, args + ["--top", "1"])
    assert r.exit_code == 0 and "top 1 of 152:" in r.stdout and r.stdout.count("max abs") == 1
    r = CliRunner().invoke(cli, args + ["--max-rel-change", "1e-6", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False
    r = CliRunner().invoke(cli, args + ["--max-rel-change", "1", "--json"])
    assert r.exit_code == 0, r.stdout
    # a format the checkpoint does not hold: the option does not fit the input (exit 3, as in
    # export-diffusers and load), not a failed verification (exit 1, which a fine-tuning gate
    # would read as a bad fine-tune)
    r = CliRunner().invoke(cli, ["verify", str(changed), "--format", "orbax", "--no-parity"])
    assert (r.exit_code, r.stderr) == (3, f"Error: {changed}: holds no orbax parameters (formats: msgpack)\n"), r.output
    r = CliRunner().invoke(cli, ["export-diffusers", str(changed), "--format", "orbax", "--out", str(tmp_path / "x")])
    assert (r.exit_code, r.stderr) == (3, f"Error: {changed}: holds no orbax parameters (formats: msgpack)\n"), r.output


def test_settings_that_differ_from_the_reference_are_each_named(base, vae, good, tmp_path):
    """A reference whose config.json has other settings (same tensors): each differing setting is a
    problem naming both values; the diffusers version that wrote each file is no setting."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(vae, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(norm_eps=1e-5, scaling_factor=0.5, _diffusers_version="0.1.0")
    (other / "config.json").write_text(json.dumps(cfg))
    report = verify_checkpoint(good, other, parity=False)
    assert not report.ok
    assert [(d["key"], d["reference"]) for d in report.config_differences] == [("norm_eps", 1e-5),
                                                                              ("scaling_factor", 0.5)]
    assert "config 'norm_eps' differs: 1e-06 vs reference 1e-05" in report.problems


ZERO_KEY = "decoder.norm_out.norm_layer.bias"  # GroupNorm biases start at zero in diffusers


def test_the_gate_names_each_tensor_over_it_and_takes_an_absolute_bound(base, vae, good):
    """A fine-tune of a base whose GroupNorm biases are all zero (diffusers' init): a tiny move of
    one is an infinite relative change, so --max-rel-change alone failed every such fine-tune, and
    the text report did not say which tensors failed it. Now each is listed (a zero reference
    said so), and --max-abs-change passes a tensor that moved by little in absolute terms, as
    numpy.allclose; a large change still fails."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    def finetune(params):
        assert not params[ZERO_KEY].any()  # what this test is about
        params[ZERO_KEY] = params[ZERO_KEY] + np.float32(1e-6)
        params[PERTURBED_KEY] = params[PERTURBED_KEY] * np.float32(1.5)  # a large change

    tuned = make_checkpoint(base / "finetuned", vae, params_hook=finetune, formats=("msgpack",))
    args = ["verify", str(tuned), "--reference", str(good), "--no-parity", "--top", "0"]
    r = verify_checkpoint(tuned, good, parity=False, max_rel_change=1e-3)
    assert sorted(r.over_tolerance) == sorted([ZERO_KEY, PERTURBED_KEY])
    assert f"tensor {ZERO_KEY!r} changed by more than 0.001 relative to the reference (all zero in the " \
           "reference: any change is infinitely large relative to it)" in r.problems
    res = CliRunner().invoke(cli, args + ["--max-rel-change", "1e-3"])
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    at = lines.index("changed by more than 0.001 relative to the reference: FAILED: 2 tensor(s)")
    listed = lines[at + 1:at + 3]  # both, whatever --top says
    assert any(ln.split()[-1] == PERTURBED_KEY for ln in listed)
    assert any(ln.split()[0] == "inf" and f" {ZERO_KEY} (all zero in the reference" in ln for ln in listed)

    both = verify_checkpoint(tuned, good, parity=False, max_rel_change=1e-3, max_abs_change=1e-5)
    assert both.over_tolerance == [PERTURBED_KEY]  # the bias moved by 1e-6 <= 1e-5: within the gate
    assert both.to_dict()["max_abs_change"] == 1e-5
    res = CliRunner().invoke(cli, args + ["--max-rel-change", "1e-3", "--max-abs-change", "1e-5"])
    assert res.exit_code == 1 and "changed by more than 0.001 relative to the reference and by more than 1e-05 " \
                                  "in absolute value: FAILED: 1 tensor(s)" in res.stdout
    res = CliRunner().invoke(cli, args + ["--max-rel-change", "0.6", "--max-abs-change", "1e-5"])
    assert res.exit_code == 0, res.stdout  # the 1.5x kernel changed by 0.5 relative
    alone = verify_checkpoint(tuned, good, parity=False, max_abs_change=1e-5)
    assert alone.over_tolerance == [PERTURBED_KEY]
    # The absolute bound alone: a zero-reference tensor fails by its absolute change, said without
    # the relative note (which pointed to --max-abs-change, the bound already given).
    tight = verify_checkpoint(tuned, good, parity=False, max_abs_change=1e-7)
    assert sorted(tight.over_tolerance) == sorted([ZERO_KEY, PERTURBED_KEY])
    assert f"tensor {ZERO_KEY!r} changed by more than 1e-07 in absolute value" in tight.problems
    for bad in (-1.0, float("inf"), float("nan")):
        res = CliRunner().invoke(cli, args + ["--max-abs-change", str(bad)])
        assert res.exit_code == 2 and "'--max-abs-change'" in res.stderr
        with pytest.raises(ValueError, match="max_abs_change must be a finite number >= 0"):
            verify_checkpoint(tuned, good, parity=False, max_abs_change=bad)
    res = CliRunner().invoke(cli, ["verify", str(tuned), "--no-parity", "--max-abs-change", "1"])
    assert res.exit_code == 2 and "--max-abs-change needs --reference" in res.stderr
    assert verify_checkpoint(tuned, good, parity=False, max_abs_change=np.float32(1)).ok


def test_bf16_checkpoint_dtypes_and_parity(base, vae, good):
    def to_bf16(params):
        for k in params:
            params[k] = params[k].astype(ml_dtypes.bfloat16)

    bf16 = make_checkpoint(base / "bf16", vae, params_hook=to_bf16, formats=("orbax",))
    r = verify_checkpoint(bf16, good)
    assert r.ok, r.format_text()
    assert r.dtype_summary() == {"bfloat16": 152}
    assert 0 < r.changes[0]["rel_change"] < 1e-2  # bf16 rounding
    assert r.parity["status"] == "passed"  # both sides run the same (bf16-valued) weights in fp32


def test_parity_skipped_when_torch_or_diffusers_missing(good, monkeypatch):
    """Faked: ``sys.modules['diffusers'] = None`` makes ``import diffusers`` raise ImportError, as
    on a machine without it (the reference is optional)."""
    monkeypatch.setitem(sys.modules, "diffusers", None)
    r = verify_checkpoint(good)
    assert r.ok
    assert r.parity == {"status": "skipped", "note": "parity check skipped: torch/diffusers not installed"}
    assert "parity: parity check skipped: torch/diffusers not installed" in r.format_text()


@pytest.mark.parametrize("key,op", [("decoder.conv_out.conv.weight", "decode"),
                                    ("encoder.down_blocks.0.resnets.0.conv1.conv.weight", "encode")])
def test_parity_failure_is_reported(good, monkeypatch, key, op):
    """Faked: the export to diffusers names is wrapped to scale one kernel, so diffusers runs other
    weights than the NNX model: the comparison of the half that uses it must catch it (the
    encoder's too: a decode alone would pass)."""
    from cogvae.converter import engine

    real = engine.export_tensors

    def tampered(*args, **kwargs):
        out = real(*args, **kwargs)
        out[key] = out[key] * 1.01
        return out

    monkeypatch.setattr(engine, "export_tensors", tampered)
    r = verify_checkpoint(good)
    assert not r.ok and r.parity["status"] == "failed" and r.parity["rel_l2"] > 1e-5
    assert [c["op"] for c in r.parity["cases"] if c["status"] == "failed"] == [op]
    assert any(p.startswith(f"parity with diffusers failed: {op}: rel L2") for p in r.problems)
    assert f"    {op} of " in r.format_text() and "FAILED" in r.format_text()


def test_an_exported_tensor_diffusers_does_not_get_is_named(good, monkeypatch):
    """The diffusers reference is built on torch's meta device (its random init would only be
    overwritten) and given the exported tensors: one the export leaves out must be named as
    missing, never run as a meta tensor. Faked: the export is wrapped to drop one tensor, as an
    export bug would."""
    from cogvae.converter import engine

    real = engine.export_tensors

    def dropping(*args, **kwargs):
        out = real(*args, **kwargs)
        del out["decoder.conv_out.conv.bias"]
        return out

    monkeypatch.setattr(engine, "export_tensors", dropping)
    r = verify_checkpoint(good)
    assert not r.ok and r.parity == {
        "status": "failed", "reason": "diffusers rejects the exported weights: missing 'decoder.conv_out.conv.bias'"}


def test_a_diverged_model_gives_strict_json_at_every_depth(base, vae, good):
    """Finite weights can still make the decode non-finite (a kernel scaled by 1e37 overflows
    fp32): verify must fail, and ``--json`` must stay strict JSON down to each parity case's
    figures, so a CI gate parsing it reads ``ok: false`` instead of crashing on a bare NaN."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    def blow_up(params):
        params["decoder.conv_in.conv.kernel"] = params["decoder.conv_in.conv.kernel"] * np.float32(1e37)

    huge = make_checkpoint(base / "huge", vae, params_hook=blow_up, formats=("msgpack",))
    r = CliRunner().invoke(cli, ["verify", str(huge), "--reference", str(good), "--json"])
    assert r.exit_code == 1

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in verify --json")

    d = json.loads(r.stdout, parse_constant=refuse)
    assert d["ok"] is False and d["parity"]["status"] == "failed"
    decode = {c["op"]: c for c in d["parity"]["cases"]}["decode"]
    assert decode["status"] == "failed" and decode["rel_l2"] in ("nan", "inf")


def test_unreadable_sources_are_reported(base, good, tmp_path):
    r = verify_checkpoint(tmp_path / "nope")
    assert not r.ok and r.problems == [f"{tmp_path / 'nope'}: no such file or folder"]
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(good, partial)
    (partial / "COMPLETE").unlink()
    r = verify_checkpoint(partial, good)
    assert not r.ok and "no COMPLETE manifest" in r.problems[0]
    assert not r.reference_missing  # nothing compared when the source could not be read
    assert _strict_json(r)["ok"] is False


def test_every_file_of_a_local_checkpoint_is_hashed(good, tmp_path):
    """verify reads one format, but a local checkpoint holds both: a corrupt file of the other
    one (and the config) must fail the report too, each problem on its own indented line."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    data = bytearray((d / "params.msgpack").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "params.msgpack").write_bytes(bytes(data))
    (d / "provenance.json").write_text((d / "provenance.json").read_text() + " ")
    r = verify_checkpoint(d, parity=False)  # reads orbax
    assert not r.ok
    assert r.problems == [f"{d}: corrupt checkpoint: 2 problems:\n"
                          f"  - params.msgpack: sha256 differs from the manifest (corrupt file)\n"
                          f"  - provenance.json: size {(d / 'provenance.json').stat().st_size}, manifest says "
                          f"{(d / 'provenance.json').stat().st_size - 1}"]
    text = r.format_text()
    assert "\n      - params.msgpack: sha256 differs" in text and "\n      - provenance.json: size" in text


@pytest.mark.parametrize("value, reference, message", [
    (0.05, None, "needs a reference"),
    (-1.0, "good", "finite number >= 0"),
    (float("nan"), "good", "finite number >= 0"),
    (float("inf"), "good", "finite number >= 0"),
])
def test_a_gate_that_cannot_gate_is_refused(good, value, reference, message):
    """--max-rel-change without --reference would always pass; nan, inf or a negative bound would
    pass or fail every tensor whatever it holds."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    with pytest.raises(ValueError, match=message):
        verify_checkpoint(good, good if reference else None, max_rel_change=value, parity=False)
    args = ["verify", str(good), "--no-parity", "--max-rel-change", str(value)] + (["--reference", str(good)] if reference else [])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and ("--max-rel-change" in r.stderr) and ("needs --reference" in r.stderr or message in r.stderr)


def test_a_zero_gate_passes_an_identical_checkpoint_with_strict_json(good):
    r = verify_checkpoint(good, good, max_rel_change=0.0, parity=False)
    assert r.ok and _strict_json(r)["max_rel_change"] == 0.0


def test_a_missing_source_or_reference_is_an_input_error_not_a_failed_check(good, tmp_path):
    """Nothing to verify is exit 3 with an Error line (as every other command), not a report whose
    other sections claim a comparison that never happened."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    r = verify_checkpoint(good, tmp_path / "nope", parity=True)
    assert not r.ok and not r.reference_loaded and r.parity["status"] == "passed"
    assert "vs reference: not compared (the reference could not be loaded)" in r.format_text()
    assert _strict_json(r)["reference_architecture"] is None
    r = verify_checkpoint(tmp_path / "nope")
    assert r.parity == {"status": "skipped", "note": "parity check skipped: the source could not be loaded"}
    for args, lines in [([str(tmp_path / "nope")], [f"Error: {tmp_path / 'nope'}: no such file or folder"]),
                        ([str(good), "--reference", str(tmp_path / "nope"), "--no-parity"],
                         [f"Error: reference: {tmp_path / 'nope'}: no such file or folder"]),
                        ([str(tmp_path / "a"), "--reference", str(tmp_path / "b")],
                         [f"Error: reference: {tmp_path / 'b'}: no such file or folder",
                          f"Error: {tmp_path / 'a'}: no such file or folder"])]:
        res = CliRunner().invoke(cli, ["verify", *args])
        assert res.exit_code == 3 and res.stdout == "" and res.stderr.splitlines() == lines


def test_a_repo_neither_local_nor_cached_offline_is_a_hub_error(tmp_path, monkeypatch):
    """Faked, and why: no network; huggingface_hub is put offline over an empty Hub cache."""
    import huggingface_hub.constants
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["verify", "me/not-cached"])
    assert res.exit_code == 5 and res.stdout == ""
    assert res.stderr.startswith("Error: me/not-cached is not in the Hub cache") and "offline mode is on" in res.stderr


def test_source_and_reference_each_have_their_own_variant(tmp_path):
    """An fp16 variant checked against the fp32 weights beside it (diffusers' save_pretrained
    writes both into one folder): --variant picks SOURCE's file, --reference-variant the
    reference's. --variant used to apply to both, so this compared the fp16 file with itself
    (change 0, OK), and an fp16-only source against an fp32-only reference was exit 3."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    both = save_tiny_vae(tmp_path / "both", fp16_variant=True)
    r = verify_checkpoint(both, both, variant="fp16", parity=False)
    assert r.ok and r.changes and 1e-5 < max(c["rel_change"] for c in r.changes) < 1e-2  # fp16 rounding
    assert all(c["rel_change"] == 0.0 for c in verify_checkpoint(both, both, variant="fp16", reference_variant="fp16",
                                                                  parity=False).changes)
    fp32_only = save_tiny_vae(tmp_path / "fp32")
    res = CliRunner().invoke(cli, ["verify", str(both), "--variant", "fp16", "--reference", str(fp32_only),
                                   "--no-parity", "--json"])
    assert res.exit_code == 0, res.stderr
    assert max(c["rel_change"] for c in json.loads(res.stdout)["changes"]) > 1e-5
    res = CliRunner().invoke(cli, ["verify", str(fp32_only), "--reference", str(both), "--reference-variant", "fp16",
                                   "--no-parity", "--max-rel-change", "1e-6"])
    assert res.exit_code == 1 and "tolerance 1e-06" in res.stdout and "RESULT: FAILED" in res.stdout


def test_a_hint_for_the_reference_names_the_references_options(good, tmp_path, monkeypatch):
    """A Hub reference holding only fp16 weights, compared without --reference-variant: the hint
    says to pass --reference-variant (--variant would change SOURCE, not the reference).
    Faked, and why: no network; the reference is a real Hub cache (huggingface_hub's layout) read
    offline."""
    import shutil

    import huggingface_hub.constants
    from click.testing import CliRunner

    from _hubcache import add_snapshot, pipeline_files
    from cogvae.converter.cli import cli

    both = save_tiny_vae(tmp_path / "both" / "vae", fp16_variant=True)
    only = tmp_path / "fp16" / "vae"
    only.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.fp16.safetensors"):
        shutil.copy(both / name, only / name)
    add_snapshot(tmp_path / "hub", "org/fp16-only", pipeline_files(only), commit="c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    res = CliRunner().invoke(cli, ["verify", str(good), "--reference", "org/fp16-only", "--no-parity"])
    assert res.exit_code == 5, res.output  # offline, the cache cannot tell an incomplete snapshot from variant-only
    assert "pass --reference-variant (e.g. fp16)" in res.stderr and "--variant" not in \
        res.stderr.replace("--reference-variant", "")
    res = CliRunner().invoke(cli, ["verify", str(good), "--reference", "org/fp16-only", "--reference-variant", "fp16",
                                   "--no-parity"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["verify", str(good), "--reference", "org/fp16-only", "--reference-revision", "",
                                   "--no-parity"])
    assert res.exit_code == 3 and "the revision is empty (--reference-revision '')" in res.stderr, res.output


def test_a_checkpoint_replaced_between_hashing_and_reading_is_not_verified(base, vae, good, tmp_path, monkeypatch):
    """verify hashes every file of a local checkpoint, then reads its parameters: a concurrent
    --overwrite in between would have it report on bytes it never hashed. Faked, to make the race
    deterministic: check_files is wrapped so that a real write_checkpoint(overwrite=True) of other
    weights lands right after the hashing. The report is an input error (exit 3), not a pass."""
    import shutil

    from click.testing import CliRunner

    import cogvae.converter.checkpoint as ck
    from cogvae.converter.cli import cli

    out = tmp_path / "ckpt"
    shutil.copytree(good, out)
    config, params, _ = ck.read_checkpoint(out)
    other = {k: v * np.float32(2) for k, v in params.items()}
    real = ck.check_files

    def hashed_then_replaced(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        ck.write_checkpoint(out, other, config, formats=("orbax", "msgpack"), provenance={"source": "swap"},
                            overwrite=True)

    monkeypatch.setattr(ck, "check_files", hashed_then_replaced)
    r = verify_checkpoint(out, parity=False)
    assert not r.ok and [str(e) for e in r.input_errors] == [
        f"{out}: replaced while it was being verified (a conversion or save with --overwrite?); verify it again "
        "when that is done"]
    res = CliRunner().invoke(cli, ["verify", str(out), "--no-parity"])
    assert res.exit_code == 3 and "replaced while it was being verified" in res.stderr


def test_a_checkpoint_replaced_while_it_is_hashed_is_an_input_error(base, vae, good, tmp_path, monkeypatch):
    """A concurrent --overwrite while verify hashes the files: a file of the new checkpoint does
    not match the old manifest, or a file is gone. That was reported as a corrupt checkpoint
    (FAILED, exit 1); it is a checkpoint to verify again (exit 3). Faked, for the timing: the
    hashing is wrapped so that a real write_checkpoint(overwrite=True) lands after its first file."""
    import shutil
    import threading

    from click.testing import CliRunner

    import cogvae.converter.checkpoint as ck
    from cogvae.converter.cli import cli

    out = tmp_path / "ckpt"
    shutil.copytree(good, out)
    config, params, _ = ck.read_checkpoint(out)
    other = {k: v * np.float32(2) for k, v in params.items()}
    real, lock, calls = ck._sha256, threading.Lock(), []

    def hash_then_replace(path):
        digest = real(path)
        with lock:  # only the first call writes; the write's own hashing comes through here too
            first = not calls
            calls.append(path)
        if first:
            ck.write_checkpoint(out, other, config, formats=("orbax", "msgpack"), provenance={"source": "swap"},
                                overwrite=True)
        return digest

    monkeypatch.setattr(ck, "_sha256", hash_then_replace)
    res = CliRunner().invoke(cli, ["verify", str(out), "--no-parity"])
    assert calls and res.exit_code == 3, res.output
    assert f"{out}: replaced while it was being verified" in res.stderr


def test_a_reference_with_nan_or_integer_tensors_fails(base, vae, good):
    """A reference is checked as the source is: its NaN and its integer tensors are named, and the
    run fails. Comparing with it used to pass (every relative change NaN or inf), since only the
    source's values were checked."""
    def edit(tensors):
        tensors["decoder.conv_out.conv.bias"] = tensors["decoder.conv_out.conv.bias"].astype(np.int32)

    folder = _edited_copy(vae, base / "bad_reference", edit)

    r = verify_checkpoint(good, reference=folder, parity=False)
    assert not r.ok and r.nonfinite == [] and r.bad_dtypes == []  # the source itself is sound
    refs = [p for p in r.load_problems if p.startswith("reference: ")]
    assert any(f"'{NAN_KEY}'" in p and "1 NaN" in p for p in refs), refs
    assert any(f"'{SHAPE_KEY}'" in p and "dtype int32 not allowed" in p for p in refs), refs
