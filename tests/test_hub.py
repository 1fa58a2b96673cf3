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

import pytest

from _hubcache import add_snapshot, pipeline_files, record_requests, save_tiny_vae
from cogvae.converter.hub import HubError, ResolvedSource, SourceError, allow_patterns, looks_like_repo_id, resolve_source
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
                                     ("a--b/c", False), ("a/b..c", False),
                                     # huggingface_hub's rules: parts start and end with a letter,
                                     # digit or '_'; a name of at most 96; no '.git' at the end
                                     ("a/.b", False), ("a/b-", False), ("-a/b", False), ("a./b", False),
                                     ("_a/_b", True), ("a/" + "x" * 96, True), ("a/" + "x" * 97, False),
                                     ("a/b.git", False), ("a/b.gi", True)])
def test_looks_like_repo_id(text, ok):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    assert looks_like_repo_id(text) is ok
    if text.count("/") == 1:  # the same verdict as the Hub client's (which also takes ids without an org)
        try:
            validate_repo_id(text)
        except HFValidationError:
            assert not ok
        else:
            assert ok


@pytest.mark.parametrize("given, message", [
    # Hub-shaped but not a valid id: was exit 5 (a Hub error) although no Hub was asked
    ("a/.b", "a/.b: no such folder and not a Hub repo id ('org/name')"),
    # a dangling symlink named like 'org/name' was looked up in the Hub cache (exit 5)
    ("w/dangling", "w/dangling is a broken symlink (to /nonexistent/x, which does not exist)"),
])
def test_a_bad_source_that_no_hub_was_asked_about_is_exit_3(tmp_path, monkeypatch, given, message):
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "dangling").symlink_to("/nonexistent/x")
    with pytest.raises(HubError) as e:
        resolve_source(given, cache_dir=tmp_path / "hub")
    assert str(e.value) == message and isinstance(e.value, SourceError)
    for args in (["convert", given, "--out", "o", "-q"], ["inspect", given], ["verify", given],
                 ["export-diffusers", given, "--out", "o"]):
        r = CliRunner().invoke(cli, args)
        # (each command says "no such ..." in its own words of what it takes)
        assert r.exit_code == 3 and r.stderr.startswith(f"Error: {given}") and r.stderr.count("\n") == 1, r.output
        assert "broken symlink" not in message or r.stderr == f"Error: {message}\n", r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


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


@pytest.mark.parametrize("case", ["weights not cached", "commit not cached"])
def test_no_network_gives_one_error_without_retries(unreachable_hub, tmp_path, vae_dir, caplog, case):
    """A request pinned to a commit with no cached file listing (the probe's second request where
    the cache lacks the weights, or a --revision sha never downloaded): with no connection,
    huggingface_hub's listing request retries for about 23 s with a warning line per try before it
    falls back to the cache. One quick repo_info is asked first instead, and the cache read alone.
    The Hub is a closed local port (real connection errors); the retries are seen in the log."""
    import logging

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {k: v for k, v in pipeline_files(vae_dir).items() if "safetensors" not in k},
                 commit=SHA_MAIN)
    revision = None if case == "weights not cached" else "c" * 40
    with caplog.at_level(logging.WARNING), pytest.raises(HubError) as e:
        resolve_source(REPO, revision=revision, cache_dir=cache, quiet=True)
    if case == "weights not cached":
        assert str(e.value).startswith(f"{REPO}@{SHA_MAIN}: no vae/diffusion_pytorch_model.safetensors")
        assert "the cached snapshot is incomplete and the Hub could not be reached; re-run with network access" \
            in str(e.value)
    else:
        assert str(e.value).startswith(f"revision {revision!r} of {REPO} is not in the Hub cache {cache} and the Hub "
                                       "cannot be reached (no network?)")
    assert [r.getMessage() for r in caplog.records if "Retry" in r.getMessage()] == []


# ---------------------------------------------------------------------------------------------
# kind, incomplete caches, cached commits, revision / subfolder checks, HTTP errors
# ---------------------------------------------------------------------------------------------

def test_a_diffusers_repo_asked_as_a_checkpoint_is_refused_after_the_probe(tmp_path, vae_dir, monkeypatch):
    """kind='checkpoint': only the probe's files of the pipeline repo are cached (what the first
    request fetches); the refusal comes after that one request, before the VAE's weights are asked
    for (offline, a second request would otherwise fail on the missing weights instead)."""
    from cogvae.converter.hub import HubSourceError, SourceError, WrongKindError

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {k: v for k, v in pipeline_files(vae_dir).items() if k.endswith(".json")},
                 commit=SHA_MAIN)
    asked = record_requests(monkeypatch)
    with pytest.raises(WrongKindError, match=rf"^{REPO}@{SHA_MAIN}: a diffusers VAE repo, not a converted cogvae "
                                             r"checkpoint$") as e:
        resolve_source(REPO, kind="checkpoint", cache_dir=cache, quiet=True)
    assert isinstance(e.value, SourceError) and isinstance(e.value, HubError) and isinstance(e.value, HubSourceError)
    assert (e.value.found, e.value.wanted) == ("diffusers", "checkpoint")
    assert asked == [(None, ["COMPLETE", "config.json", "model_index.json", "vae/config.json"])]
    with pytest.raises(ValueError, match="unknown kind"):
        resolve_source(REPO, kind="vae", cache_dir=cache, quiet=True)


def test_a_local_folder_of_the_other_kind_is_refused(vae_dir):
    """kind applies to a local folder too (the same message as convert gives for a checkpoint)."""
    from cogvae.converter.hub import WrongKindError

    with pytest.raises(WrongKindError, match=r"not a converted cogvae checkpoint \(no COMPLETE manifest\)"):
        resolve_source(str(vae_dir), kind="checkpoint")
    assert resolve_source(str(vae_dir), kind="diffusers").kind == "diffusers"


def _sharded_vae(folder):
    """The tiny VAE saved sharded by diffusers' own save_pretrained (several real shards)."""
    from _hubcache import tiny_diffusers_vae

    tiny_diffusers_vae(0).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(p.name for p in folder.iterdir() if "-of-" in p.name)
    assert len(shards) > 2
    return shards


def test_a_shard_missing_from_the_cache_is_an_incomplete_snapshot(tmp_path, vae_dir):
    """A cache filled file by file (no cached tree listing, as hf_hub_download leaves it) lacks one
    shard the index names; offline, that is an incomplete snapshot (HubError, exit 5), not a bad
    sharded file of the repo. The same with the listing cached (snapshot_download's own check)."""
    sharded = tmp_path / "sharded" / "vae"
    shards = _sharded_vae(sharded)
    files = {k: v for k, v in pipeline_files(sharded).items() if shards[2] not in k}
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, files, commit=SHA_MAIN)
    with pytest.raises(HubError) as e:
        resolve_source(REPO, cache_dir=cache, quiet=True)
    msg = str(e.value)
    assert msg.startswith(f"{REPO}@{SHA_MAIN}: 1 of the {len(shards)} shard(s) named in "
                          "vae/diffusion_pytorch_model.safetensors.index.json are not in the snapshot at ")
    assert f"(first: vae/{shards[2]}): the cached snapshot is incomplete and offline mode is on (HF_HUB_OFFLINE=1); " \
           "re-run with network access" in msg
    from cogvae.converter.hub import SourceError

    assert not isinstance(e.value, SourceError)  # the Hub's, not bad input: exit 5

    cache2 = tmp_path / "hub2"
    add_snapshot(cache2, REPO, files, commit=SHA_MAIN, tree_only={f"vae/{shards[2]}": 9})
    with pytest.raises(HubError, match="incomplete and offline mode is on"):
        resolve_source(REPO, cache_dir=cache2, quiet=True)
    # complete: resolves
    add_snapshot(tmp_path / "hub3", REPO, pipeline_files(sharded), commit=SHA_MAIN)
    assert resolve_source(REPO, cache_dir=tmp_path / "hub3", quiet=True).revision == SHA_MAIN


def test_weights_missing_from_the_cache_say_the_snapshot_is_incomplete(tmp_path, vae_dir):
    """The config is cached, not the weights (no cached listing): offline, the error says the cached
    snapshot is incomplete and offline mode is on (the --variant hint stays, as a second possibility).
    With a cached listing that shows the repo has no such weights, it is the repo that lacks them."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {k: v for k, v in pipeline_files(vae_dir).items() if "safetensors" not in k},
                 commit=SHA_MAIN)
    with pytest.raises(HubError) as e:
        resolve_source(REPO, cache_dir=cache, quiet=True)
    assert str(e.value).startswith(f"{REPO}@{SHA_MAIN}: no vae/diffusion_pytorch_model.safetensors (nor a sharded "
                                   "index) in the snapshot at ")
    assert str(e.value).endswith(": the cached snapshot is incomplete and offline mode is on (HF_HUB_OFFLINE=1); "
                                 "re-run with network access (or pass --variant (e.g. fp16) if the repo only has "
                                 "variant weights)")

    cache2 = tmp_path / "hub2"
    files = {k: v for k, v in pipeline_files(vae_dir).items() if k.endswith(".json") or "fp16" in k}
    add_snapshot(cache2, REPO, files, commit=SHA_MAIN, tree_only={})  # the listing: exactly these files
    with pytest.raises(HubError) as e:
        resolve_source(REPO, cache_dir=cache2, quiet=True)
    assert "incomplete" not in str(e.value)
    assert str(e.value).endswith("(found: diffusion_pytorch_model.fp16.safetensors); pass --variant (e.g. fp16) if "
                                 "the repo only has variant weights")


def test_the_vae_config_missing_from_the_cache_of_a_pipeline(tmp_path, vae_dir):
    """Only model_index.json is cached (it names the VAE 'vae'): the cache is incomplete, rather
    than the hint to pass --subfolder vae that was already given."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, {k: v for k, v in pipeline_files(vae_dir).items() if k == "model_index.json"},
                 commit=SHA_MAIN)
    with pytest.raises(HubError, match=r"no vae/config\.json in the snapshot at .*: the cached snapshot is "
                                       r"incomplete and offline mode is on") as e:
        resolve_source(REPO, cache_dir=cache, quiet=True)
    assert "--subfolder" not in str(e.value)


def test_a_cached_commit_is_used_without_asking_the_hub(unreachable_hub, cache, tmp_path, vae_dir, monkeypatch,
                                                        capsys):
    """--revision <full sha> whose snapshot holds every needed file: no request at all (a commit's
    files never change), so no retries to wait for when the Hub cannot be reached. The Hub is an
    unreachable local port, and snapshot_download is wrapped to fail at once if called. A commit
    whose snapshot lacks a needed file is still asked for, and so is the kind 'checkpoint' of a
    diffusers snapshot when no cached tree listing shows the commit has no COMPLETE manifest."""
    from cogvae.converter.hub import WrongKindError

    asked = record_requests(monkeypatch, refuse=True)
    r = resolve_source(REPO, revision=SHA_OLD, cache_dir=cache)
    assert (r.revision, r.kind, r.is_hub) == (SHA_OLD, "diffusers", True)
    assert r.folder == cache / "models--org--tiny-cogvideox" / "snapshots" / SHA_OLD
    assert resolve_source(REPO, revision=SHA_MAIN, variant="fp16", cache_dir=cache).revision == SHA_MAIN
    assert resolve_source(REPO, revision=SHA_OLD, kind="diffusers", cache_dir=cache).revision == SHA_OLD
    listed = tmp_path / "listed"
    add_snapshot(listed, REPO, pipeline_files(vae_dir), commit=SHA_MAIN, tree_only={})
    with pytest.raises(WrongKindError, match=rf"{REPO}@{SHA_MAIN}: a diffusers VAE repo, not a converted"):
        resolve_source(REPO, revision=SHA_MAIN, kind="checkpoint", cache_dir=listed)
    assert asked == [] and capsys.readouterr().err == ""
    with pytest.raises(AssertionError, match="asked the Hub"):  # no bf16 weights cached: the Hub is asked
        resolve_source(REPO, revision=SHA_OLD, variant="bf16", cache_dir=cache)
    with pytest.raises(AssertionError, match="asked the Hub"):  # no listing: is there a manifest?
        resolve_source(REPO, revision=SHA_OLD, kind="checkpoint", cache_dir=cache)
    assert [rev for rev, _ in asked] == [SHA_OLD, SHA_OLD]


def test_a_cached_commit_without_the_variant_offline(cache):
    """A full sha cached without the asked-for variant goes to the Hub as before (offline: one
    clear error; the cache is incomplete as far as it can tell)."""
    with pytest.raises(HubError, match=rf"{REPO}@{SHA_OLD}: no vae/diffusion_pytorch_model\.bf16\.safetensors .* "
                                       "the cached snapshot is incomplete and offline mode is on"):
        resolve_source(REPO, revision=SHA_OLD, variant="bf16", cache_dir=cache, quiet=True)


@pytest.mark.parametrize("revision", ["", "  "])
def test_an_empty_revision_is_refused_before_any_request(cache, monkeypatch, revision):
    from cogvae.converter.hub import HubSourceError

    asked = record_requests(monkeypatch, refuse=True)
    with pytest.raises(HubSourceError, match=rf"^{REPO}: the revision is empty"):
        resolve_source(REPO, revision=revision, cache_dir=cache, quiet=True)
    assert asked == []


def test_revision_on_a_local_folder_is_a_bad_source(vae_dir):
    """A SourceError (exit 3 in every command) as well as a HubError, raised in one place."""
    from cogvae.converter.hub import SourceError
    from cogvae.converter.loading import SourceError as LoadingSourceError

    assert SourceError is LoadingSourceError
    with pytest.raises(SourceError, match="Hub repo ids only") as e:
        resolve_source(str(vae_dir), revision="main")
    assert isinstance(e.value, HubError)
    with pytest.raises(SourceError, match="no such folder"):
        resolve_source("./no/such/folder")


@pytest.mark.parametrize("sub", ["/vae", "vae/", "/vae/"])
def test_a_subfolder_with_slashes(cache, sub, tmp_path, vae_dir):
    """Leading / trailing slashes are stripped wherever the subfolder is used: the Hub patterns and
    find_diffusers_vae on the snapshot (and on a local pipeline folder) agree."""
    r = resolve_source(REPO, subfolder=sub, cache_dir=cache, quiet=True)
    src = find_diffusers_vae(r.folder, subfolder=sub)
    assert src.folder == r.folder / "vae" and src.weights_path.name == "diffusion_pytorch_model.safetensors"
    assert allow_patterns(sub) == allow_patterns("vae")
    assert find_diffusers_vae(vae_dir.parent, subfolder=sub).folder == vae_dir


@pytest.fixture
def hub_answering(monkeypatch):
    """A local HTTP server standing in for the Hub that answers every request with one HTTP status
    (the real huggingface_hub client talks to it; nothing leaves the machine). Set
    ``state['status']``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import huggingface_hub.constants

    state = {"status": 500, "requests": 0}

    class Answer(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            state["requests"] += 1
            body = b'{"error": "nope"}'
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status,what", [(500, "a Hub server error"), (429, "rate limited")])
def test_an_http_error_status_is_reported_as_such(hub_answering, tmp_path, status, what):
    """HTTP 500 / 429 from the Hub (nothing cached): the status is named, not 'cannot be reached'."""
    hub_answering["status"] = status
    with pytest.raises(HubError) as e:
        resolve_source("org/down", cache_dir=tmp_path / "empty", quiet=True)
    msg = str(e.value)
    assert msg == (f"org/down is not in the Hub cache {tmp_path / 'empty'} and the Hub answered HTTP {status} ({what}); "
                   "try again later, or pass a local folder")
    assert hub_answering["requests"] >= 1
