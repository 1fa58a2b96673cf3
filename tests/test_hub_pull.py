"""Pulling from the Hub: a checkpoint pushed by ``cogvae push`` (and a diffusers repo) used by its
repo id in ``load``, ``cogvae verify``, ``cogvae export-diffusers`` and ``cogvae inspect``.

What is faked, and why: there is no network here, so nothing is downloaded. The repo a push makes
is put into a real Hub cache instead (huggingface_hub's own layout, see ``_hubcache``): exactly
the files ``push``'s upload plan lists (``plan_upload``: the checkpoint folder's files and the
generated README.md), and ``huggingface_hub.constants.HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` are
patched to point at it (huggingface_hub reads both from the environment at import time). The real
``snapshot_download`` resolves every request from that cache. The checkpoints are real ones,
converted from diffusers' own tiny ``AutoencoderKLCogVideoX``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from _hubcache import add_snapshot, pipeline_files, record_requests, save_tiny_vae
from cogvae.converter import load
from cogvae.converter.checkpoint import read_checkpoint, write_checkpoint
from cogvae.converter.cli import cli, convert_command
from cogvae.converter.hub import HubError, checkpoint_patterns, resolve_source
from cogvae.converter.layout import DIFFUSERS_WEIGHTS
from cogvae.converter.push import plan_upload
from cogvae.converter.saving import model_params

REPO = "me/tiny-vae-jax"
PIPELINE = "org/tiny-cogvideox"
SHA_MAIN = "1" * 40
SHA_FT = "2" * 40
SHA_PIPE = "3" * 40


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two real checkpoints of the tiny VAE (the second with changed weights, a 'fine-tune'), the
    diffusers folder they came from, and the files a push of each would upload."""
    from cogvae.converter.convert import convert

    base = tmp_path_factory.mktemp("pull")
    vae_dir = save_tiny_vae(base / "vae")
    ckpt = base / "ckpt"
    convert(str(vae_dir), ckpt, quiet=True, validate=False)
    config, params, _ = read_checkpoint(ckpt)
    key = "decoder.conv_out.conv.bias"
    tuned = dict(params, **{key: params[key] + np.float32(0.5)})
    ft = write_checkpoint(base / "ft", tuned, config, provenance=json.loads((ckpt / "provenance.json").read_text()))

    def repo_files(folder: Path, diffusers: Path | None = None) -> dict[str, Path]:
        files, card = plan_upload(folder, REPO, diffusers=diffusers)
        (folder.parent / f"{folder.name}_README.md").write_text(card)
        where = {"README.md": folder.parent / f"{folder.name}_README.md", DIFFUSERS_WEIGHTS: diffusers}
        return {f["path"]: where.get(f["path"]) or folder / f["path"] for f in files}

    from cogvae.converter import export_diffusers

    export_diffusers(ckpt, base / "ckpt-diffusers")
    export_diffusers(ft, base / "ft-diffusers")
    return dict(base=base, vae_dir=vae_dir, ckpt=ckpt, ft=ft, files=repo_files(ckpt), ft_files=repo_files(ft),
                changed=key, both_files=repo_files(ckpt, base / "ckpt-diffusers" / DIFFUSERS_WEIGHTS),
                ft_weights=base / "ft-diffusers" / DIFFUSERS_WEIGHTS)


@pytest.fixture
def hub(tmp_path, made, monkeypatch):
    """A Hub cache holding REPO (main: the checkpoint; branch 'ft': the fine-tune) and a pipeline
    repo PIPELINE with the diffusers VAE in vae/; offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, made["files"], commit=SHA_MAIN, refs=("main",))
    add_snapshot(cache, REPO, made["ft_files"], commit=SHA_FT, refs=("ft",))
    add_snapshot(cache, PIPELINE, pipeline_files(made["vae_dir"]), commit=SHA_PIPE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _same_params(a, b) -> None:
    pa, pb = model_params(a), model_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert np.asarray(pa[k]).tobytes() == np.asarray(pb[k]).tobytes(), k


@pytest.mark.parametrize("fmt", [None, "orbax", "msgpack"])
def test_load_a_pushed_checkpoint_by_repo_id(hub, made, fmt):
    kw = {} if fmt is None else {"format": fmt}
    r = resolve_source(REPO, quiet=True, **kw)
    assert (r.kind, r.revision, r.format, r.is_hub) == ("checkpoint", SHA_MAIN, fmt or "orbax", True)
    _same_params(load(REPO, **kw), load(made["ckpt"], **kw))


def test_a_branch_of_the_repo_by_revision(hub, made):
    ft = load(REPO, revision="ft")
    _same_params(ft, load(made["ft"]))
    assert resolve_source(REPO, revision="ft", quiet=True).revision == SHA_FT
    _same_params(load(REPO, revision=SHA_FT), ft)


def test_only_one_format_is_fetched(tmp_path, made, monkeypatch):
    """snapshot_download is wrapped to record what each request asks for (the real one still
    runs). Only the probe's files are cached: the probe, then one format pinned to the commit the
    probe resolved (offline, that second request finds nothing and says so). With the format
    cached too, the probe is the only request: a commit's files never change."""
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download

    def recording(**kw):
        asked.append((kw["revision"], kw["allow_patterns"]))
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {k: v for k, v in made["files"].items() if k in ("COMPLETE", "config.json")},
                 commit=SHA_MAIN)
    with pytest.raises(HubError, match=r"lacks 1 file\(s\) of the checkpoint's msgpack format \(first: params.msgpack\)"):
        resolve_source(REPO, format="msgpack", cache_dir=cache, quiet=True)
    assert asked == [(None, ["COMPLETE", "config.json", "model_index.json", "vae/config.json"]),
                     (SHA_MAIN, ["COMPLETE", "config.json", "provenance.json", "params.msgpack"])]
    assert checkpoint_patterns("orbax")[-1] == "orbax/*"

    asked.clear()
    add_snapshot(tmp_path / "full", REPO, made["files"], commit=SHA_MAIN)
    assert resolve_source(REPO, format="msgpack", cache_dir=tmp_path / "full", quiet=True).format == "msgpack"
    assert len(asked) == 1


def test_a_cache_with_one_format_loads_offline(tmp_path, made, monkeypatch):
    """Only the msgpack files were ever downloaded (the cached tree listing names the Orbax ones
    too): offline, load picks the cached format; asking for Orbax is one clear error."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    files = {k: v for k, v in made["files"].items() if not k.startswith("orbax/")}
    orbax = {k: v.stat().st_size for k, v in made["files"].items() if k.startswith("orbax/")}
    add_snapshot(cache, REPO, files, commit=SHA_MAIN, tree_only=orbax)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    r = resolve_source(REPO, cache_dir=cache, quiet=True)
    assert (r.kind, r.format) == ("checkpoint", "msgpack")
    _same_params(load(REPO, cache_dir=cache), load(made["ckpt"]))
    with pytest.raises(HubError, match=rf"{REPO}@{SHA_MAIN}: the cached snapshot in .* is incomplete and offline"):
        load(REPO, cache_dir=cache, format="orbax")


def test_a_format_the_checkpoint_repo_does_not_hold_is_bad_input(tmp_path, monkeypatch):
    """A repo whose manifest lists msgpack only, asked for Orbax: bad input (exit 3 in every
    command, as for a local checkpoint), where it was a Hub error (exit 5). Offline, from a
    pre-populated cache: the real snapshot_download finds the probe's files there."""
    import huggingface_hub.constants

    from cogvae.converter.convert import convert
    from cogvae.converter.hub import HubSourceError

    ck = tmp_path / "ck"
    convert(None, ck, formats="msgpack", quiet=True, validate=False)
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {p.name: p for p in ck.iterdir()}, commit=SHA_MAIN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    message = f"{REPO}@{SHA_MAIN}: the checkpoint holds no orbax parameters (formats: msgpack)"
    with pytest.raises(HubSourceError) as e:
        load(REPO, format="orbax")
    assert str(e.value) == message
    for args in (["verify", REPO, "--format", "orbax", "--no-parity"],
                 ["export-diffusers", REPO, "--format", "orbax", "--out", str(tmp_path / "x")]):
        r = CliRunner().invoke(cli, args)
        assert (r.exit_code, r.stderr) == (3, f"Error: {message}\n"), (args, r.output)
    assert not (tmp_path / "x").exists()


def test_a_diffusers_repo_loads_by_repo_id(hub, made):
    assert resolve_source(PIPELINE, quiet=True).kind == "diffusers"
    _same_params(load(PIPELINE), load(made["vae_dir"]))


def test_verify_a_pushed_checkpoint_by_repo_id(hub, made):
    r = CliRunner().invoke(cli, ["verify", REPO, "--reference", PIPELINE, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and f"Hub snapshot {SHA_MAIN}" in report["source"]["detail"]
    assert report["parity"]["status"] == "passed"
    # the fine-tune on its branch: sound, and its one changed tensor is reported against the base
    r = CliRunner().invoke(cli, ["verify", REPO, "--revision", "ft", "--reference", PIPELINE, "--no-parity", "--json"])
    assert r.exit_code == 0, r.output
    changed = [c["key"] for c in json.loads(r.output)["changes"] if c["max_abs"] > 0]
    assert changed == [made["changed"]]


def test_a_corrupt_download_fails_verify_and_load(tmp_path, made, monkeypatch):
    """A cached blob whose bytes differ from the manifest's sha256 (a damaged download)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    bad = tmp_path / "params.msgpack"
    data = bytearray(made["files"]["params.msgpack"].read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    add_snapshot(cache, REPO, dict(made["files"], **{"params.msgpack": bad}), commit=SHA_MAIN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    r = CliRunner().invoke(cli, ["verify", REPO, "--no-parity"])
    assert r.exit_code == 0, r.output  # Orbax (the default) is intact
    with pytest.raises(Exception, match=r"params.msgpack: sha256 differs from the manifest"):
        load(REPO, format="msgpack")
    from cogvae.converter.verify import verify_checkpoint

    report = verify_checkpoint(REPO, format="msgpack", parity=False)
    assert not report.ok and any("params.msgpack: sha256 differs" in p for p in report.load_problems)


def test_export_and_inspect_a_pushed_checkpoint_by_repo_id(hub, made, tmp_path):
    r = CliRunner().invoke(cli, ["export-diffusers", REPO, "--out", str(tmp_path / "from-hub")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["export-diffusers", str(made["ckpt"]), "--out", str(tmp_path / "local")])
    assert r.exit_code == 0, r.output
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    r = CliRunner().invoke(cli, ["export-diffusers", PIPELINE, "--out", str(tmp_path / "x")])
    assert r.exit_code == 3 and "a diffusers VAE repo, not a converted cogvae checkpoint" in r.output
    r = CliRunner().invoke(cli, ["inspect", REPO, "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["kind"] == "cogvae-checkpoint" and data["num_tensors"] == len(model_params(load(made["ckpt"])))


def test_converting_a_checkpoint_repo_is_a_clear_error(hub, tmp_path):
    r = CliRunner().invoke(convert_command, [REPO, "--out", str(tmp_path / "o")])
    assert r.exit_code == 3
    assert f"{REPO}@{SHA_MAIN}: a converted cogvae checkpoint, not a diffusers VAE" in r.output
    assert not (tmp_path / "o").exists()


def test_verify_checks_the_diffusers_copy_of_a_repo_pushed_with_it(tmp_path, made, monkeypatch):
    """A repo pushed with --with-diffusers holds the weights twice. verify fetches the diffusers
    copy too and requires it to be exactly the checkpoint's export; a copy replaced by other
    weights (here the fine-tune's, as a later upload through another tool would leave it) fails,
    naming the tensor."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, made["both_files"], commit=SHA_MAIN, refs=("main",))
    add_snapshot(cache, REPO, dict(made["both_files"], **{DIFFUSERS_WEIGHTS: made["ft_weights"]}), commit=SHA_FT,
                 refs=("mixed",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    r = CliRunner().invoke(cli, ["verify", REPO, "--no-parity"])
    assert r.exit_code == 0, r.output
    assert f"diffusers copy ({DIFFUSERS_WEIGHTS}): identical to the checkpoint (" in r.stdout
    r = CliRunner().invoke(cli, ["verify", REPO, "--revision", "mixed", "--no-parity", "--json"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["diffusers_copy"]["status"] == "differs" and report["diffusers_copy"]["differs"] == [made["changed"]]
    assert any(f"1 tensor(s) differ (first: '{made['changed']}')" in p for p in report["problems"])
    _same_params(load(REPO, revision="mixed"), load(made["ckpt"]))  # load reads the cogvae format only


def test_verify_fails_on_diffusers_weights_beside_the_copy_that_cogvae_did_not_write(tmp_path, made, monkeypatch):
    """Another tool uploaded sharded diffusers weights beside a --with-diffusers push: from_pretrained
    reads the index (before the single file), so diffusers loaded other weights while verify said
    the copy was identical. The repo's cached listing names the shards (they are not downloaded);
    a local folder holding an fp16 variant beside the checkpoint fails the same way."""
    import shutil

    import huggingface_hub.constants

    others = {"diffusion_pytorch_model.safetensors.index.json": 300,
              "diffusion_pytorch_model-00001-of-00002.safetensors": 1000,
              "diffusion_pytorch_model-00002-of-00002.safetensors": 1000}
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, made["both_files"], commit=SHA_MAIN, tree_only=others)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    r = CliRunner().invoke(cli, ["verify", REPO, "--no-parity", "--json"])
    assert r.exit_code == 1, r.output
    copy = json.loads(r.stdout)["diffusers_copy"]
    assert copy["status"] == "differs" and copy["foreign"] == sorted(others), copy
    assert copy["differs"] == [] and "3 other diffusers weights file(s) beside the checkpoint" in copy["reason"]

    local = tmp_path / "local"
    shutil.copytree(made["ckpt"], local)
    shutil.copy(made["both_files"][DIFFUSERS_WEIGHTS], local / "diffusion_pytorch_model.fp16.safetensors")
    r = CliRunner().invoke(cli, ["verify", str(local), "--no-parity"])
    assert r.exit_code == 1 and "beside the checkpoint: diffusion_pytorch_model.fp16.safetensors" in r.stdout, r.output


# ---------------------------------------------------------------------------------------------
# the other kind refused after the first request; verify's diffusers copy; cached commits;
# bad sources (an empty revision, --revision on a local folder) are exit 3 in every command
# ---------------------------------------------------------------------------------------------


PROBE = ["COMPLETE", "config.json", "model_index.json", "vae/config.json"]


@pytest.fixture
def probed(tmp_path, made, monkeypatch):
    """A Hub cache holding only what the first (probe) request fetches: the checkpoint repo's
    COMPLETE and config.json, the pipeline repo's model_index.json and vae/config.json. Offline:
    any request for the weights would fail (so a test passing shows none was needed)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {k: v for k, v in made["files"].items() if k in ("COMPLETE", "config.json")},
                 commit=SHA_MAIN)
    add_snapshot(cache, PIPELINE, {k: v for k, v in pipeline_files(made["vae_dir"]).items() if k.endswith(".json")},
                 commit=SHA_PIPE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_repo_of_the_other_kind_is_refused_after_the_first_request(probed, monkeypatch, tmp_path):
    """resolve_source(kind=), fetch(kind=) and export-diffusers refuse a repo of the other kind
    right after the probe: one request, no weights asked for (the weights are not cached, and
    offline a second request would fail with a Hub error, exit 5, instead of exit 3)."""
    from cogvae.converter.hub import WrongKindError
    from cogvae.converter.loading import SourceError, fetch

    asked = record_requests(monkeypatch)
    with pytest.raises(WrongKindError, match=rf"^{REPO}@{SHA_MAIN}: a converted cogvae checkpoint, not a diffusers "
                                             r"VAE: load it with cogvae.converter.load"):
        resolve_source(REPO, kind="diffusers", quiet=True)
    assert asked == [(None, PROBE)]
    asked.clear()
    with pytest.raises(SourceError, match=rf"^{PIPELINE}@{SHA_PIPE}: a diffusers VAE repo, not a converted cogvae "
                                          "checkpoint$"):
        fetch(PIPELINE, kind="checkpoint")
    assert asked == [(None, PROBE)]
    asked.clear()
    r = CliRunner().invoke(cli, ["export-diffusers", PIPELINE, "--out", str(tmp_path / "x")])
    assert r.exit_code == 3, r.output
    assert f"{PIPELINE}@{SHA_PIPE}: a diffusers VAE repo, not a converted cogvae checkpoint" in r.output
    assert asked == [(None, PROBE)] and not (tmp_path / "x").exists()


def test_converting_a_checkpoint_repo_is_refused_after_the_first_request(probed, monkeypatch, tmp_path):
    """cogvae-convert of a converted checkpoint repo: exit 3 after the probe, without fetching the
    checkpoint's parameters (not cached here: offline, a second request would be exit 5)."""
    from cogvae.converter.cli import convert_command

    asked = record_requests(monkeypatch)
    r = CliRunner().invoke(convert_command, [REPO, "--out", str(tmp_path / "ckpt"), "-q"])
    assert r.exit_code == 3, r.output
    assert f"{REPO}@{SHA_MAIN}: a converted cogvae checkpoint, not a diffusers VAE" in r.stderr
    assert asked == [(None, PROBE)] and not (tmp_path / "ckpt").exists()


def test_load_with_a_variant_of_a_checkpoint_is_a_clear_error(probed, monkeypatch):
    """variant= (and a subfolder other than the default) apply to diffusers weights: a checkpoint
    repo is refused with a ValueError after the probe, before its parameters are fetched (only the
    probe's files are cached, offline)."""
    asked = record_requests(monkeypatch)
    with pytest.raises(ValueError, match=rf"^{REPO}@{SHA_MAIN}: a converted cogvae checkpoint: variant= applies to "
                                         "diffusers weights only"):
        load(REPO, variant="fp16")
    with pytest.raises(ValueError, match=r"subfolder=, variant= apply to diffusers weights only"):
        load(REPO, subfolder="autoencoder", variant="fp16")
    assert asked == [(None, PROBE), (None, ["COMPLETE", "config.json", "model_index.json", "autoencoder/config.json"])]


def test_load_a_checkpoint_repo_with_the_default_subfolder(hub, made):
    """The default subfolder (with or without slashes) and variant=None are no choice for a
    checkpoint: ignored, as before."""
    for kw in ({"subfolder": "vae"}, {"subfolder": "/vae/"}, {"variant": None, "mapping": None}):
        _same_params(load(REPO, **kw), load(made["ckpt"]))


def test_verify_of_a_cached_checkpoint_asks_the_hub_once(tmp_path, made, monkeypatch, unreachable_hub):
    """verify asks for the diffusers copy (also=) in the first request: a fully cached checkpoint
    (pushed without the copy, no cached listing) resolves with that one request when the Hub cannot
    be reached; a second request, pinned to the commit, would wait through huggingface_hub's
    retries. snapshot_download is wrapped to record requests, failing at once on a second one."""
    import huggingface_hub

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, made["files"], commit=SHA_MAIN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    asked = []
    real = huggingface_hub.snapshot_download

    def once(**kw):
        asked.append((kw["revision"], kw["allow_patterns"]))
        assert len(asked) == 1, f"a second request: {kw['allow_patterns']}"
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", once)
    r = resolve_source(REPO, quiet=True, also=[DIFFUSERS_WEIGHTS])
    assert (r.kind, r.revision, r.format) == ("checkpoint", SHA_MAIN, "orbax")
    assert asked == [(None, PROBE + [DIFFUSERS_WEIGHTS])]
    asked.clear()
    res = CliRunner().invoke(cli, ["verify", REPO, "--no-parity", "--json"])
    assert res.exit_code == 0, res.output
    assert len(asked) == 1


def test_the_diffusers_copy_comes_with_the_first_request(tmp_path, made, monkeypatch):
    """A repo pushed with --with-diffusers, fully cached: verify's also= file is found by the probe
    (one request); load asks for no diffusers copy (offline, requests recorded)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, made["both_files"], commit=SHA_MAIN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    asked = record_requests(monkeypatch)
    r = resolve_source(REPO, cache_dir=cache, quiet=True, also=[DIFFUSERS_WEIGHTS])
    assert (r.folder / DIFFUSERS_WEIGHTS).is_file() and len(asked) == 1
    asked.clear()
    _same_params(load(REPO, cache_dir=cache), load(made["ckpt"]))
    assert all(DIFFUSERS_WEIGHTS not in pats for _, pats in asked)


def test_a_listed_diffusers_copy_missing_from_the_cache_offline(tmp_path, made, monkeypatch):
    """The cached listing (trees/<commit>.json) shows the repo has a diffusers copy the cache lacks:
    offline, verify's resolve says the snapshot is incomplete (it cannot check the copy), while
    load, which never reads the copy, resolves."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    size = made["both_files"][DIFFUSERS_WEIGHTS].stat().st_size
    add_snapshot(cache, REPO, made["files"], commit=SHA_MAIN, tree_only={DIFFUSERS_WEIGHTS: size})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="incomplete and offline mode is on"):
        resolve_source(REPO, cache_dir=cache, quiet=True, also=[DIFFUSERS_WEIGHTS])
    assert resolve_source(REPO, cache_dir=cache, quiet=True).kind == "checkpoint"


def test_a_cached_checkpoint_commit_is_used_without_asking_the_hub(tmp_path, made, monkeypatch, unreachable_hub):
    """--revision <full sha> of a checkpoint whose format is cached: no request (load, verify's
    also= without a cached listing to say the commit has the file, kind refusal); with a cached
    listing naming an also= file that is not cached, the Hub is asked. snapshot_download fails at
    once if called."""
    import huggingface_hub.constants

    from cogvae.converter.hub import WrongKindError

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, made["ft_files"], commit=SHA_FT, refs=("ft",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    asked = record_requests(monkeypatch, refuse=True)
    _same_params(load(REPO, revision=SHA_FT), load(made["ft"]))
    r = resolve_source(REPO, revision=SHA_FT, also=[DIFFUSERS_WEIGHTS], format="msgpack")
    assert (r.kind, r.format, r.revision) == ("checkpoint", "msgpack", SHA_FT)
    with pytest.raises(WrongKindError, match=rf"{REPO}@{SHA_FT}: a converted cogvae checkpoint, not a diffusers VAE"):
        resolve_source(REPO, revision=SHA_FT, kind="diffusers")
    assert asked == []

    listed = tmp_path / "listed"
    size = made["both_files"][DIFFUSERS_WEIGHTS].stat().st_size
    add_snapshot(listed, REPO, made["ft_files"], commit=SHA_FT, tree_only={DIFFUSERS_WEIGHTS: size})
    assert resolve_source(REPO, revision=SHA_FT, cache_dir=listed).kind == "checkpoint"  # load: no also=
    with pytest.raises(AssertionError, match="asked the Hub"):
        resolve_source(REPO, revision=SHA_FT, cache_dir=listed, also=[DIFFUSERS_WEIGHTS])


@pytest.fixture
def local_repo_name(tmp_path, made, monkeypatch):
    """A local folder named like the pipeline repo id (org/tiny-cogvideox, a diffusers VAE) in the
    working directory."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(made["vae_dir"], tmp_path / PIPELINE)
    return PIPELINE


@pytest.mark.parametrize("command", [["inspect"], ["export-diffusers", "--out", "o"], ["verify", "--no-parity"],
                                     ["convert", "--out", "o", "--no-validate"]])
def test_revision_on_a_local_folder_is_exit_3_everywhere(hub, local_repo_name, command):
    name, *rest = command
    args = [name, local_repo_name, *rest, "--revision", "main"]
    r = CliRunner().invoke(cli, args) if name != "convert" else CliRunner().invoke(convert_command, args[1:])
    assert r.exit_code == 3, r.output
    assert f"{local_repo_name}: --revision applies to Hub repo ids only, not to a local folder" in r.output


def test_a_reference_revision_on_a_local_folder_names_its_own_option(hub, made, local_repo_name):
    r = CliRunner().invoke(cli, ["verify", str(made["ckpt"]), "--no-parity", "--reference", local_repo_name,
                                 "--reference-revision", "main"])
    assert r.exit_code == 3 and (f"reference: {local_repo_name}: --reference-revision applies to Hub repo ids "
                                 "only, not to a local folder") in r.stderr, r.output


@pytest.mark.parametrize("command", [["inspect"], ["export-diffusers", "--out", "o"], ["verify", "--no-parity"],
                                     ["convert", "--out", "o", "--no-validate"]])
def test_an_empty_revision_is_exit_3_everywhere(hub, monkeypatch, tmp_path, command):
    """--revision '' is refused before any request (snapshot_download fails at once if called)."""
    monkeypatch.chdir(tmp_path)
    asked = record_requests(monkeypatch, refuse=True)
    name, *rest = command
    args = [name, REPO, *rest, "--revision", ""]
    r = CliRunner().invoke(cli, args) if name != "convert" else CliRunner().invoke(convert_command, args[1:])
    assert r.exit_code == 3, r.output
    assert f"{REPO}: the revision is empty" in r.output and asked == []


def test_verify_against_a_reference_revision_fetches_no_reference_copy(tmp_path, made, monkeypatch):
    """--reference-revision picks the base's commit (here the fine-tune branch, so a change shows
    against it), and only the source's diffusers copy is asked for: the reference's (REPO main
    was pushed with one) is never compared, so it is never fetched (offline cache, requests
    recorded)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, made["both_files"], commit=SHA_MAIN, refs=("main",))
    add_snapshot(cache, REPO, made["ft_files"], commit=SHA_FT, refs=("ft",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    asked = record_requests(monkeypatch)
    r = CliRunner().invoke(cli, ["verify", REPO, "--reference", REPO, "--reference-revision", "ft", "--no-parity",
                                 "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert f"Hub snapshot {SHA_FT}" in report["reference"]["detail"]
    assert f"Hub snapshot {SHA_MAIN}" in report["source"]["detail"]
    assert [c["key"] for c in report["changes"] if c["max_abs"] > 0] == [made["changed"]]
    assert report["diffusers_copy"]["status"] == "identical"  # the source's copy: fetched and compared
    reference_asks_copy = [DIFFUSERS_WEIGHTS in pats for rev, pats in asked if rev == "ft"]
    assert reference_asks_copy and not any(reference_asks_copy)


@pytest.mark.parametrize("args, message", [
    (["inspect", REPO, "--variant", "fp16"], f"{REPO}@{SHA_MAIN}: a converted cogvae checkpoint: --variant applies"),
    (["inspect", REPO, "--subfolder", "vae_x"], "--subfolder applies to diffusers weights only"),
    (["verify", REPO, "--variant", "fp16", "--no-parity"], f"{REPO}@{SHA_MAIN}: a converted cogvae checkpoint: "
                                                           "--variant applies"),
    (["verify", REPO, "--reference", REPO, "--reference-variant", "fp16", "--no-parity"],
     f"reference: {REPO}@{SHA_MAIN}: a converted cogvae checkpoint: --reference-variant applies"),
])
def test_a_diffusers_option_for_a_checkpoint_is_refused_not_ignored(hub, args, message):
    """As load() refuses variant= for a checkpoint: a check of 'the fp16 variant' that silently
    checked the checkpoint's one set of parameters would pass for the wrong reason."""
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 3 and message in r.stderr and not r.stdout, r.output


@pytest.mark.parametrize("option", [["--reference-revision", "v1"], ["--reference-variant", "fp16"],
                                    ["--reference-subfolder", "vae_x"]])
def test_a_reference_option_without_a_reference_is_a_usage_error(made, option):
    from cogvae.converter.verify import verify_checkpoint

    r = CliRunner().invoke(cli, ["verify", str(made["ckpt"]), "--no-parity", *option])
    assert r.exit_code == 2 and f"{option[0]} given without --reference" in r.stderr
    with pytest.raises(ValueError, match="given without a reference"):
        verify_checkpoint(made["ckpt"], parity=False, **{option[0][2:].replace("-", "_"): option[1]})


@pytest.mark.parametrize("command", [["inspect", "--variant", "fp16"], ["verify", "--no-parity", "--variant", "fp16"],
                                     ["verify", "--no-parity", "--subfolder", "vae_x"]])
def test_a_diffusers_option_for_a_local_checkpoint_is_refused_too(made, command):
    r = CliRunner().invoke(cli, [command[0], str(made["ckpt"]), *command[1:]])
    assert r.exit_code == 3 and f"{made['ckpt']}: a converted cogvae checkpoint: {command[-2]} applies" in r.stderr
