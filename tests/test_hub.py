"""resolve_source: local folders, and Hub repo ids resolved offline through the real
``huggingface_hub.snapshot_download``.

What is faked, and why: there is no network here, so nothing is downloaded. Instead a real Hub
cache is built in ``tmp_path`` (huggingface_hub's own on-disk layout: ``models--org--name`` with
``blobs/``, ``refs/`` and ``snapshots/<commit>/`` symlinks; see ``_hubcache``), filled with a tiny
VAE written by diffusers' ``save_pretrained``, and ``huggingface_hub.constants.HF_HUB_OFFLINE`` is
set to True (huggingface_hub reads ``HF_HUB_OFFLINE`` from the environment at import time, so the
constant is patched). The cache folder is passed with ``cache_dir=`` for the same reason.
"""

from __future__ import annotations

import json
import os

import pytest

from _hubcache import add_snapshot, pipeline_files, save_tiny_vae
from cogvae.converter.hub import HubError, ResolvedSource, allow_patterns, looks_like_repo_id, resolve_source
from cogvae.converter.loading import find_diffusers_vae

REPO = "org/tiny-cogvideox"
SHA_MAIN = "a" * 39 + "1"
SHA_OLD = "b" * 39 + "2"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network in tests: every Hub request raises OfflineModeIsEnabled instead of connecting."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("tiny") / "vae", fp16_variant=True)


@pytest.fixture
def cache(tmp_path, vae_dir):
    """A Hub cache with REPO at two commits: SHA_MAIN (refs main and v1.0: a pipeline repo with
    vae/ in fp32 and fp16) and SHA_OLD (ref 'old': fp32 only, different weights)."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, pipeline_files(vae_dir), commit=SHA_MAIN, refs=("main", "v1.0"))
    old = save_tiny_vae(tmp_path / "old" / "vae", seed=1)
    add_snapshot(cache, REPO, pipeline_files(old), commit=SHA_OLD, refs=("old",))
    return cache


def test_local_folder_is_returned_as_is(vae_dir):
    r = resolve_source(str(vae_dir))
    assert r == ResolvedSource(folder=vae_dir, source_id=str(vae_dir), revision=None, is_hub=False)


@pytest.mark.parametrize("path", ["./no/such/folder", "/no/such/folder", "a/b/c", "../missing", "justaname"])
def test_missing_local_folder_is_a_clear_error(path):
    with pytest.raises(HubError, match=r"no such folder") as e:
        resolve_source(path)
    assert str(e.value).startswith(path)
    assert "\n" not in str(e.value)


def test_revision_on_a_local_folder_is_refused(vae_dir):
    with pytest.raises(HubError, match="Hub repo ids only"):
        resolve_source(str(vae_dir), revision="main")


@pytest.mark.parametrize("text,ok", [("org/name", True), ("THUDM/CogVideoX-2b", True), ("a/b.c_d-e", True),
                                     ("./x", False), ("/abs", False), ("a/b/c", False), ("name", False),
                                     ("a--b/c", False), ("a/b..c", False)])
def test_looks_like_repo_id(text, ok):
    assert looks_like_repo_id(text) is ok


def test_resolves_pipeline_repo_offline_with_vae_subfolder(cache):
    r = resolve_source(REPO, cache_dir=cache, quiet=True)
    assert r.is_hub and r.source_id == REPO and r.revision == SHA_MAIN
    assert r.folder == cache / "models--org--tiny-cogvideox" / "snapshots" / SHA_MAIN
    src = find_diffusers_vae(r.folder)  # what the converter does next
    assert src.weights_path.name == "diffusion_pytorch_model.safetensors"
    assert src.weights_path.resolve().parent.name == "blobs"  # a real cache symlink


@pytest.mark.parametrize("revision,sha", [(SHA_OLD, SHA_OLD), ("old", SHA_OLD), ("v1.0", SHA_MAIN), ("main", SHA_MAIN)])
def test_revision_by_sha_and_by_ref_name(cache, revision, sha):
    r = resolve_source(REPO, revision=revision, cache_dir=cache, quiet=True)
    assert r.revision == sha
    assert r.folder.name == sha


def test_variant_fp16_file_is_chosen(cache):
    r = resolve_source(REPO, variant="fp16", cache_dir=cache, quiet=True)
    src = find_diffusers_vae(r.folder, variant="fp16")
    assert src.weights_path.name == "diffusion_pytorch_model.fp16.safetensors"
    from cogvae.converter.st_io import open_safetensors

    assert {str(open_safetensors(src.weights_path).dtype_of(k)) for k in open_safetensors(src.weights_path)} == {"float16"}


def test_variant_missing_from_snapshot_is_a_clear_error(cache):
    with pytest.raises(HubError, match=r"org/tiny-cogvideox@b{39}2: no vae/diffusion_pytorch_model\.bf16\.safetensors"):
        resolve_source(REPO, revision="old", variant="bf16", cache_dir=cache, quiet=True)


def test_vae_only_repo_with_empty_or_default_subfolder(tmp_path, vae_dir):
    """A VAE-only repo (config and weights at the root, no model_index.json) resolves with
    ``subfolder=""`` and with the default ``"vae"`` alike, as a local VAE folder does; a pipeline
    repo without the asked-for subfolder is still an error that suggests ``--subfolder ''``."""
    cache = tmp_path / "hub"
    files = {p.name: p for p in vae_dir.iterdir()}
    add_snapshot(cache, "org/vae-only", files, commit=SHA_MAIN)
    for sub in ("", "vae"):
        r = resolve_source("org/vae-only", subfolder=sub, cache_dir=cache, quiet=True)
        assert (r.folder / "config.json").is_file() and r.kind == "diffusers"
        assert find_diffusers_vae(r.folder, subfolder=sub).folder == r.folder
    add_snapshot(cache, "org/no-vae", {"config.txt": vae_dir / "config.json"}, commit=SHA_MAIN)
    with pytest.raises(HubError, match=r"no vae/config\.json .*--subfolder ''"):
        resolve_source("org/no-vae", cache_dir=cache, quiet=True)


def test_a_pipeline_whose_vae_has_another_name(tmp_path, vae_dir):
    """model_index.json names the pipeline's VAE component: the error says which --subfolder."""
    cache = tmp_path / "hub"
    files = pipeline_files(vae_dir, subfolder="vae_2")
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "CogVideoXPipeline", "vae_2": ["diffusers", "AutoencoderKLCogVideoX"],
                                 "scheduler": ["diffusers", "CogVideoXDDIMScheduler"]}))
    add_snapshot(cache, "org/pipe", dict(files, **{"model_index.json": index}), commit=SHA_MAIN)
    with pytest.raises(HubError, match=r"no vae/config\.json .*names the VAE 'vae_2': pass --subfolder vae_2\)"):
        resolve_source("org/pipe", cache_dir=cache, quiet=True)
    assert resolve_source("org/pipe", subfolder="vae_2", cache_dir=cache, quiet=True).kind == "diffusers"


def test_nothing_cached_and_offline_is_a_clear_error(tmp_path):
    with pytest.raises(HubError) as e:
        resolve_source("org/not-cached", cache_dir=tmp_path / "empty", quiet=True)
    msg = str(e.value)
    assert "org/not-cached is not in the Hub cache" in msg and "offline mode is on (HF_HUB_OFFLINE=1)" in msg
    assert "\n" not in msg


def test_uncached_revision_offline_is_a_clear_error(cache):
    with pytest.raises(HubError, match=r"revision 'v9' of org/tiny-cogvideox is not in the Hub cache .* offline mode"):
        resolve_source(REPO, revision="v9", cache_dir=cache, quiet=True)


def test_only_the_vae_files_are_required(tmp_path, vae_dir):
    """With the commit's tree listing cached, snapshot_download checks that every file matching
    the allow patterns is in the snapshot: a 5 GB transformer that was never downloaded must not
    be among them (offline this resolves), while a listed-but-missing VAE file is reported."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, pipeline_files(vae_dir), commit=SHA_MAIN,
                 tree_only={"transformer/diffusion_pytorch_model.safetensors": 5 << 30, "text_encoder/model.safetensors": 9})
    assert resolve_source(REPO, cache_dir=cache, quiet=True).revision == SHA_MAIN

    cache2 = tmp_path / "hub2"
    files = {k: v for k, v in pipeline_files(vae_dir).items() if "fp16" not in k}
    add_snapshot(cache2, REPO, files, commit=SHA_MAIN, tree_only={"vae/diffusion_pytorch_model.fp16.safetensors": 9})
    with pytest.raises(HubError, match="cached snapshot .* is incomplete"):
        resolve_source(REPO, variant="fp16", cache_dir=cache2, quiet=True)


def test_allow_patterns_cover_single_and_sharded_weights():
    import fnmatch

    pats = allow_patterns("vae", "fp16")
    want = ["vae/config.json", "model_index.json", "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
            "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    refuse = ["vae/diffusion_pytorch_model.safetensors", "transformer/config.json",
              "vae/diffusion_pytorch_model-00001-of-00002.safetensors", "vae/diffusion_pytorch_model.bin"]
    assert all(any(fnmatch.fnmatch(f, p) for p in pats) for f in want)
    assert not any(any(fnmatch.fnmatch(f, p) for p in pats) for f in refuse)
    assert "config.json" in allow_patterns("", None)


def test_quiet_draws_no_progress_bar(cache, capsys):
    resolve_source(REPO, cache_dir=cache, quiet=True)
    assert capsys.readouterr().err == ""


def test_offline_env_var_is_honoured_via_huggingface_hub(cache, monkeypatch):
    """The HF_HUB_CACHE default: without cache_dir, huggingface_hub's constant is used."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_source(REPO, quiet=True).folder.parent.parent == cache / "models--org--tiny-cogvideox"


def test_repo_not_found_and_gated_messages(monkeypatch, tmp_path):
    """Online failures cannot be produced without a network: snapshot_download is replaced by a
    function raising huggingface_hub's real error classes (built on a real httpx2 response,
    the HTTP client huggingface_hub 2.x uses)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    def raiser(exc_cls, status):
        def fake(**kwargs):
            resp = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
            raise exc_cls("boom", response=resp)
        return fake

    cases = [(RepositoryNotFoundError, 404, "org/x: no such local folder, and repository not found on the Hugging Face Hub"),
             (GatedRepoError, 403, "gated repo: accept its licence"),
             (RevisionNotFoundError, 404, "revision 'nope' not found")]
    for exc_cls, status, msg in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", raiser(exc_cls, status))
        with pytest.raises(HubError, match=msg):
            resolve_source("org/x", revision="nope", cache_dir=tmp_path, quiet=True)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode against a Hub that refuses connections: the endpoint is pointed at a closed
    local port (real connection errors, no traffic leaves the machine)."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")


def test_no_network_and_nothing_cached_is_a_clear_error(unreachable_hub, tmp_path):
    with pytest.raises(HubError) as e:
        resolve_source("org/not-cached", cache_dir=tmp_path / "empty", quiet=True)
    assert "org/not-cached is not in the Hub cache" in str(e.value)
    assert "the Hub cannot be reached (no network?)" in str(e.value)


def test_no_network_falls_back_to_the_cache(unreachable_hub, cache, monkeypatch):
    """One request only: the probe falls back to the cached commit, which already holds the VAE's
    files, so nothing more is asked of the Hub (a second request would wait through
    huggingface_hub's retries). snapshot_download is wrapped to count calls; the real one runs."""
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or real(**kw))
    assert resolve_source(REPO, revision="old", cache_dir=cache, quiet=True).revision == SHA_OLD
    assert len(calls) == 1
