"""push_checkpoint: a converted checkpoint folder and its model card uploaded to the Hub.

What is faked, and why: there is no network here and tests must never write to the real Hub, so
the Hub API is replaced. Most tests inject ``api=`` a small recording class with the
``HfApi`` methods push uses (``create_repo``, ``create_branch``, ``repo_info``, ``list_repo_files``,
``create_commit``); it plays a repo holding given files and writes out what each commit's real
``huggingface_hub.CommitOperationAdd`` would upload, so its contents can be checked. One test
instead patches those methods on the real ``huggingface_hub.HfApi`` class, so the default
``HfApi(token=...)`` construction path is exercised. The model card is built by the real
``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from _hubcache import TINY_CONFIG, add_snapshot, pipeline_files, save_tiny_vae
from cogvae.converter.push import PushError, PushInputError, model_card_text, push_checkpoint

SHA = "c" * 40
SOURCE = "THUDM/CogVideoX-5b"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real converted checkpoint made by ``convert("THUDM/CogVideoX-5b", ...)`` from a Hub cache.

    Faked, and why: no network, so the tiny VAE (written by diffusers' save_pretrained) is put into
    a real Hub cache under that repo id and huggingface_hub's HF_HUB_CACHE / HF_HUB_OFFLINE
    constants point at it (they are read at import time); the conversion itself is the real one,
    so provenance.json names the Hub source and commit as it would for the published model."""
    base = tmp_path_factory.mktemp("push")
    cache = base / "hub"
    add_snapshot(cache, SOURCE, pipeline_files(save_tiny_vae(base / "vae")), commit=SHA)
    from cogvae.converter.convert import convert

    with pytest.MonkeyPatch.context() as mp:
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        convert(SOURCE, base / "ckpt", quiet=True, validate=False)
    return base / "ckpt"


#: the commit a fake repo's branch points at (push lists its files there and commits on top of it)
HEAD = "c" * 40


def _head_info(self, repo_id, **kwargs):
    """HfApi.repo_info of a fake repo (patched on the real class): its branch's head commit."""
    return SimpleNamespace(sha=HEAD)


class RecordingApi:
    """Fake HfApi: records every call; the repo holds ``remote`` (paths); create_commit writes what
    its add operations upload into ``uploaded`` and records the deleted paths."""

    def __init__(self, tmp: Path, fail: Exception | None = None, remote: tuple[str, ...] = ()):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.tmp = tmp
        self.fail = fail
        self.remote = list(remote)
        self.uploaded: Path | None = None
        self.deleted: list[str] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", args, kwargs))

    def repo_info(self, repo_id, **kwargs):
        self.calls.append(("repo_info", (repo_id,), kwargs))
        return SimpleNamespace(sha=HEAD)

    def list_repo_files(self, repo_id, **kwargs):
        self.calls.append(("list_repo_files", (repo_id,), kwargs))
        return list(self.remote)

    def create_commit(self, **kwargs):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        self.calls.append(("create_commit", (), kwargs))
        self.uploaded = self.tmp / "uploaded"
        for op in kwargs["operations"]:
            if isinstance(op, CommitOperationAdd):
                dst = self.uploaded / op.path_in_repo
                dst.parent.mkdir(parents=True, exist_ok=True)
                with op.as_file() as f:
                    dst.write_bytes(f.read())
            else:
                assert isinstance(op, CommitOperationDelete)
                self.deleted.append(op.path_in_repo)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'d' * 40}",
                               oid="d" * 40, pr_url=None)


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("given", ["snapshot", "snapshot/vae", "relative"])
def test_a_conversion_of_a_hub_snapshot_path_is_recorded_as_the_repo(ckpt, tmp_path, monkeypatch, given):
    """The folder `snapshot_download` and `hf download` hand out, given as a path: it was recorded
    as a local folder, so the pushed card had no base_model and no licence, and provenance.json
    named this machine's Hub cache. It is now the repo at its commit, as the repo id gives it.
    Faked: none (the ckpt fixture's Hub cache, made by _hubcache.add_snapshot)."""
    from cogvae.converter.convert import convert

    snap = ckpt.parent / "hub" / ("models--" + SOURCE.replace("/", "--")) / "snapshots" / SHA
    source = {"snapshot": snap, "snapshot/vae": snap / "vae",
              "relative": Path(os.path.relpath(snap, tmp_path))}[given]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ck"
    convert(source, out, quiet=True, validate=False, formats="msgpack")
    src = json.loads((out / "provenance.json").read_text())["source"]
    assert (src["id"], src["revision"], src["is_hub"], src["subfolder"]) == (SOURCE, SHA, True, "vae")
    assert [f["path"] for f in src["files"]] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert "folder" not in src and str(tmp_path) not in json.dumps(src) and "models--" not in json.dumps(src)
    card = ModelCard(push_checkpoint(out, "me/x", dry_run=True)["model_card"])
    assert card.data.base_model == SOURCE and card.data.license is not None


def test_push_uploads_checkpoint_and_model_card(ckpt, tmp_path):
    """Fake: the injected RecordingApi stands in for the Hub (no network)."""
    before = _files(ckpt)
    api = RecordingApi(tmp_path)
    out = push_checkpoint(ckpt, "me/tiny-vae-jax", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "repo_info", "list_repo_files", "create_commit"]
    name, args, kw = api.calls[0]
    assert (args, kw) == (("me/tiny-vae-jax",), dict(private=False, exist_ok=True, repo_type="model"))
    assert api.calls[1][1:] == (("me/tiny-vae-jax",), dict(revision=None, repo_type="model"))
    assert api.calls[2][1:] == (("me/tiny-vae-jax",), dict(revision=HEAD, repo_type="model"))
    up = api.calls[3][2]
    assert up["repo_id"] == "me/tiny-vae-jax" and up["revision"] is None and up["create_pr"] is False
    assert up["parent_commit"] == HEAD
    assert out["deleted"] == [] and api.deleted == []
    assert up["commit_message"].startswith("Upload CogVideoX VAE converted by cogvae")

    uploaded = _files(api.uploaded)
    assert uploaded == {**before, "README.md": uploaded["README.md"]}  # every file, plus the card
    for rel in before:  # byte-identical contents
        assert (api.uploaded / rel).read_bytes() == (ckpt / rel).read_bytes()
    assert _files(ckpt) == before and not (ckpt / "README.md").exists()  # user's folder untouched
    # A Hub source's provenance names its files by their paths in the repo, and the packaged mapping
    # by its package name: no folder of this machine (the Hub cache, site-packages, the home folder)
    # goes into a pushed repo.
    import cogvae.converter

    local = {str(ckpt.parent), str(Path(cogvae.converter.__file__).resolve().parents[1]), str(Path.home())}
    prov_text = (api.uploaded / "provenance.json").read_text()
    assert not [d for d in local if d in prov_text and d not in ("/", "")], prov_text
    prov = json.loads(prov_text)
    assert [f["path"] for f in prov["source"]["files"]] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert "folder" not in prov["source"] and prov["mapping"]["path"] == "cogvae.mappings/cogvideox_vae.yaml"

    card = ModelCard.load(api.uploaded / "README.md")
    assert card.data.library_name == "cogvae"
    assert card.data.base_model == SOURCE
    assert (card.data.license, card.data.license_name) == ("other", "cogvideox-license")
    assert f"at commit `{SHA}`" in card.text  # the resolved source revision, from provenance.json
    assert card.data.tags == ["jax", "flax", "nnx", "cogvideox", "vae", "video"]
    assert 'REPO_ID = "me/tiny-vae-jax"' in card.text and "vae = load(REPO_ID)" in card.text
    assert "from cogvae.converter import load" in card.text
    # the base exactly as converted: its commit, not whatever its main branch holds later
    assert f"cogvae verify me/tiny-vae-jax --reference {SOURCE} --reference-revision {SHA}   #" in card.text
    assert "`orbax/` (Orbax checkpoint), `params.msgpack` (Flax msgpack)" in card.text
    assert out["url"].endswith("/commit/" + "d" * 40) and out["commit"] == "d" * 40
    assert out["dry_run"] is False
    assert {f["path"]: f["size"] for f in out["files"]} == uploaded


def test_a_new_push_replaces_the_previous_checkpoint_in_one_commit(ckpt, tmp_path):
    """The repo (RecordingApi, no network) holds an earlier Orbax + msgpack checkpoint, whose Orbax
    data files have other names, plus files a user added. Pushing an msgpack-only checkpoint over
    it is one commit that deletes the earlier checkpoint's files it does not replace, and nothing
    else: a revision never mixes two checkpoints."""
    from cogvae.converter.checkpoint import read_checkpoint, write_checkpoint

    config, params, _ = read_checkpoint(ckpt)
    only = write_checkpoint(tmp_path / "msgpack-only", params, config, formats=("msgpack",),
                            provenance=json.loads((ckpt / "provenance.json").read_text()) | {"formats": ["msgpack"]})
    earlier = ["orbax/_METADATA", "orbax/d/0123abcd", "orbax/ocdbt.process_0/manifest.ocdbt", "params.msgpack",
               "config.json", "provenance.json", "COMPLETE", "README.md", "diffusion_pytorch_model.safetensors",
               "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
               "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-00001-of-00002.safetensors"]
    # a user's files, some with names close to a checkpoint's: never touched
    theirs = [".gitattributes", "samples/clip.mp4", "orbax-notes.txt", "vae/diffusion_pytorch_model.safetensors",
              "params.msgpack.old", "config.json.bak", "diffusion_pytorch_model-notes.md"]
    api = RecordingApi(tmp_path, remote=tuple(earlier + theirs))
    out = push_checkpoint(only, "me/x", api=api)
    assert [c[0] for c in api.calls].count("create_commit") == 1
    # diffusers weights at the root (any variant, shard, index, or .bin, which diffusers falls back
    # to) pair with the config.json the push replaces: stale, so deleted
    assert api.deleted == out["deleted"] == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                                             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors",
                                             "diffusion_pytorch_model.safetensors",
                                             "diffusion_pytorch_model.safetensors.index.json", "orbax/_METADATA",
                                             "orbax/d/0123abcd", "orbax/ocdbt.process_0/manifest.ocdbt"]
    assert sorted(_files(api.uploaded)) == sorted([*_files(only), "README.md"])
    card = ModelCard.load(api.uploaded / "README.md")
    assert "`params.msgpack` (Flax msgpack)" in card.text and "`orbax/`" not in card.text
    assert "fetches one format (msgpack)" in card.text


@pytest.mark.parametrize("create_pr, advice", [
    (False, "create the branch first, or pass --create-pr"),
    (True, "a pull request needs an existing base branch (create it first, or leave out --revision"),
])
def test_a_missing_branch_gives_advice_that_fits_the_push(ckpt, tmp_path, create_pr, advice):
    """Faked: RecordingApi's repo_info raises huggingface_hub's RevisionNotFoundError, as the real
    HfApi does for a branch that does not exist (with --create-pr, cogvae creates no branch: the
    branch is the pull request's base). Telling a --create-pr push to pass --create-pr would send
    the user in a circle."""
    import httpx2
    from huggingface_hub.errors import RevisionNotFoundError

    class NoBranch(RecordingApi):
        def repo_info(self, repo_id, **kwargs):
            request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}/revision/ft-v3")
            raise RevisionNotFoundError("404 Client Error. Revision Not Found",
                                        response=httpx2.Response(404, request=request))

    with pytest.raises(PushError, match="revision") as e:
        push_checkpoint(ckpt, "me/x", api=NoBranch(tmp_path), revision="ft-v3", create_pr=create_pr)
    assert advice in str(e.value) and ("pass --create-pr" in str(e.value)) is not create_pr


def test_with_diffusers_the_repo_also_loads_in_diffusers(ckpt, tmp_path):
    """--with-diffusers: the same commit holds diffusion_pytorch_model.safetensors, byte-identical
    to `cogvae export-diffusers`, and diffusers' own from_pretrained loads the uploaded files (the
    shared config.json and those weights) as the model they were converted from.
    Fake: RecordingApi stands in for the Hub (no network)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogvae.converter import export_diffusers

    api = RecordingApi(tmp_path, remote=(".gitattributes", "diffusion_pytorch_model.safetensors"))
    out = push_checkpoint(ckpt, "me/both", api=api, with_diffusers=True)
    assert out["deleted"] == []  # replaced, not deleted
    export_diffusers(ckpt, tmp_path / "exported")
    weights = "diffusion_pytorch_model.safetensors"
    assert (api.uploaded / weights).read_bytes() == (tmp_path / "exported" / weights).read_bytes()
    assert {f["path"]: f["size"] for f in out["files"]} == _files(api.uploaded)
    got = AutoencoderKLCogVideoX.from_pretrained(api.uploaded).state_dict()
    want = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "exported").state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
    card = ModelCard.load(api.uploaded / "README.md")
    assert "diffusers" in card.data.tags and 'AutoencoderKLCogVideoX.from_pretrained("me/both")' in card.text
    dry = push_checkpoint(ckpt, "me/both", dry_run=True, with_diffusers=True)
    assert dry["files"] == out["files"]


@pytest.mark.parametrize("private,revision,create_pr", [(True, None, False), (False, "jax", False), (False, "main", True)])
def test_flags_are_passed_through(ckpt, tmp_path, private, revision, create_pr):
    """Fake: RecordingApi (no network); checks what push_checkpoint would ask of the Hub."""
    api = RecordingApi(tmp_path)
    out = push_checkpoint(ckpt, "me/x", private=private, revision=revision, create_pr=create_pr, api=api)
    # the result (push --json) says where it went, as the text output does
    assert (out["revision"], out["create_pr"]) == (revision or "main", create_pr)
    calls = {c[0]: c for c in api.calls}
    assert calls["create_repo"][2]["private"] is private
    assert calls["create_commit"][2]["revision"] == revision
    assert calls["create_commit"][2]["create_pr"] is create_pr
    # the files a commit replaces are those of the branch it builds on (a pull request's base), at
    # the commit it builds on: a push landing in between makes this one fail, not mix the two
    assert calls["repo_info"][2]["revision"] == revision
    assert calls["list_repo_files"][2]["revision"] == HEAD and calls["create_commit"][2]["parent_commit"] == HEAD
    # a new branch is created for a plain commit to it; a PR targets an existing revision
    assert ("create_branch" in calls) == (revision is not None and not create_pr)
    if "create_branch" in calls:
        assert calls["create_branch"][2]["branch"] == revision and calls["create_branch"][2]["exist_ok"] is False


def test_dry_run_lists_files_and_sizes_without_api(ckpt, monkeypatch):
    """Fake: huggingface_hub.HfApi is replaced by a class that fails on construction, to prove a
    dry run never touches the API (and needs no token)."""
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("dry run must not build an HfApi")

    monkeypatch.setattr(huggingface_hub, "HfApi", boom)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = push_checkpoint(ckpt, "me/x", dry_run=True)
    assert out["dry_run"] is True and "url" not in out
    sizes = {f["path"]: f["size"] for f in out["files"]}
    assert {k: v for k, v in sizes.items() if k != "README.md"} == _files(ckpt)
    assert sizes["README.md"] == len(out["model_card"].encode())
    assert not (ckpt / "README.md").exists()


def test_a_push_that_another_push_overtook_commits_nothing(ckpt, tmp_path):
    """Two pushes to one branch at once: this one listed the repo's files at HEAD, then another
    commit landed. The commit names HEAD as its parent, so the Hub refuses it (HTTP 412) rather than
    building it on the other push's files with deletions computed from a stale listing (a manifest
    beside another checkpoint's Orbax files, which every reader refuses). Faked, and why: no
    network, so RecordingApi answers create_commit as the Hub does when the branch has moved."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    class Overtaken(RecordingApi):
        def create_commit(self, **kwargs):
            self.calls.append(("create_commit", (), kwargs))
            assert kwargs["parent_commit"] == HEAD
            request = httpx2.Request("POST", "https://huggingface.co/api/models/me/x/commit/main")
            raise HfHubHTTPError("412 Client Error: Precondition Failed (a commit has happened since)",
                                 response=httpx2.Response(412, request=request))

    api = Overtaken(tmp_path)
    with pytest.raises(PushError) as e:
        push_checkpoint(ckpt, "me/x", api=api)
    assert str(e.value) == ("me/x: upload failed: main moved while pushing (another commit landed after its files "
                            "were listed); nothing was committed: push again")
    assert api.uploaded is None


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_push_to_a_new_branch_removes_the_branch_it_created(ckpt, tmp_path, existed):
    """The upload fails after create_branch: a branch this push created pointed at main's commit,
    so `load(repo, revision=branch)` would have served main's checkpoint under the fine-tune's
    branch name. It is deleted again and the error says so; a branch that was there before (HTTP
    409 on create_branch) is left alone. Faked, and why: no network, so RecordingApi plays the
    Hub, answering create_branch with 409 for an existing branch and failing the commit."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def http(status: int, what: str):
        request = httpx2.Request("POST", "https://huggingface.co/api/models/me/x/" + what)
        return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))

    class Failing(RecordingApi):
        def create_branch(self, *args, **kwargs):
            super().create_branch(*args, **kwargs)
            if existed:
                raise http(409, "branch/ft")

        def create_commit(self, **kwargs):
            self.calls.append(("create_commit", (), kwargs))
            raise http(500, "commit/ft")

        def delete_branch(self, *args, **kwargs):
            self.calls.append(("delete_branch", args, kwargs))

    api = Failing(tmp_path)
    with pytest.raises(PushError) as e:
        push_checkpoint(ckpt, "me/x", api=api, revision="ft")
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "repo_info", "list_repo_files", "create_commit"] + (
        [] if existed else ["delete_branch"])
    assert str(e.value) == "me/x: upload failed: 500 Client Error" + (
        "" if existed else "; the branch 'ft' this push created was deleted again")
    if not existed:
        assert api.calls[-1][1:] == (("me/x",), dict(branch="ft", repo_type="model"))


def test_private_is_refused_for_an_existing_public_repo(ckpt, tmp_path):
    """--private goes to create_repo(exist_ok=True), which leaves an existing repo's visibility as
    it is: the weights went into a public repo. Refused before any branch or commit; a private
    repo (or a new one) takes the push. Faked, and why: no network, so RecordingApi plays a repo
    whose repo_info says whether it is private."""
    for is_private in (False, True):
        class Existing(RecordingApi):
            def repo_info(self, repo_id, **kwargs):
                super().repo_info(repo_id, **kwargs)
                return SimpleNamespace(sha=HEAD, private=is_private)

        api = Existing(tmp_path)
        if is_private:
            push_checkpoint(ckpt, "me/x", api=api, private=True, revision="ft")
            assert [c[0] for c in api.calls][-1] == "create_commit"
            continue
        with pytest.raises(PushError) as e:
            push_checkpoint(ckpt, "me/x", api=api, private=True, revision="ft")
        assert str(e.value) == ("me/x: the repo exists and is public, and --private does not change an existing "
                                "repo's visibility; nothing was pushed (make it private on the Hub first, or leave "
                                "out --private)")
        assert [c[0] for c in api.calls] == ["create_repo", "repo_info"]


def test_real_hfapi_class_with_patched_methods(ckpt, tmp_path, monkeypatch):
    """Fake: create_repo/list_repo_files/create_commit are patched on the real huggingface_hub.HfApi
    class (recording, no network: an empty new repo), so push_checkpoint's own HfApi(token=...)
    path runs."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # faked online, whatever the env

    seen = []

    def create_repo(self, repo_id, **kw):
        seen.append(("create_repo", self.token, repo_id, kw))

    def list_repo_files(self, repo_id, **kw):
        return [".gitattributes"]

    def create_commit(self, **kw):
        seen.append(("create_commit", self.token, kw["repo_id"], sorted(op.path_in_repo for op in kw["operations"])))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{'e' * 40}",
                                          commit_message=kw["commit_message"], commit_description="",
                                          oid="e" * 40, pr_url=None)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", _head_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    out = push_checkpoint(ckpt, "me/real-class", token="hf_not_a_real_token", private=True)
    assert seen[0] == ("create_repo", "hf_not_a_real_token", "me/real-class",
                       dict(private=True, exist_ok=True, repo_type="model"))
    assert seen[1][:3] == ("create_commit", "hf_not_a_real_token", "me/real-class")
    assert seen[1][3] == sorted([*_files(ckpt), "README.md"])  # one commit, every file, nothing deleted
    assert out["commit"] == "e" * 40


def test_missing_token_is_a_clear_error(ckpt, monkeypatch):
    """Fake: huggingface_hub.get_token returns None (no login on this machine, none passed)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PushError, match=r"^no Hugging Face token: run `hf auth login` or set HF_TOKEN$"):
        push_checkpoint(ckpt, "me/x")


def test_network_errors_become_push_errors(ckpt, tmp_path):
    """Fake: RecordingApi raising a real connection error class, as HfApi does with no network."""
    import httpx2

    api = RecordingApi(tmp_path, fail=httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(PushError, match=r"me/x: create_repo failed: cannot reach the Hugging Face Hub"):
        push_checkpoint(ckpt, "me/x", api=api)


def test_offline_mode_refuses_to_push(ckpt, tmp_path, monkeypatch):
    """No fake API: offline mode on, the real HfApi raises OfflineModeIsEnabled before any traffic."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="offline mode"):
        push_checkpoint(ckpt, "me/x", token="hf_not_a_real_token")


@pytest.mark.parametrize("missing", ["config.json", "provenance.json", "COMPLETE", "params.msgpack"])
def test_incomplete_checkpoint_is_refused(ckpt, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / missing).unlink()
    with pytest.raises(PushError, match=rf"not a complete converted checkpoint \(missing: .*{missing}"):
        push_checkpoint(broken, "me/x", dry_run=True)


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("victim", ["params.msgpack", "orbax"])
def test_a_file_that_fails_its_sha256_is_not_pushed(ckpt, tmp_path, victim, dry_run):
    """A byte flipped in a parameter file, its size unchanged: ``load`` refuses such a checkpoint,
    so push must not upload it (nor list it in a dry run). Fake: RecordingApi (no network)."""
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    target = broken / victim
    if target.is_dir():  # the largest Orbax data file
        target = max((p for p in target.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    rel = target.relative_to(broken).as_posix()
    api = RecordingApi(tmp_path)
    with pytest.raises(PushError, match=rf"{rel}: sha256 differs from the manifest .*not pushed"):
        push_checkpoint(broken, "me/x", dry_run=dry_run, api=api)
    assert api.calls == []


def test_not_a_folder(tmp_path):
    with pytest.raises(PushError, match="no such folder"):
        push_checkpoint(tmp_path / "nope", "me/x", dry_run=True)
    with pytest.raises(PushError, match="not a Hub repo id"):
        push_checkpoint(tmp_path, "no-slash", dry_run=True)


@pytest.mark.parametrize("source,license,license_name", [
    ("THUDM/CogVideoX-2b", "apache-2.0", None),
    ("THUDM/CogVideoX-5b", "other", "cogvideox-license"),
    ("THUDM/CogVideoX-5b-I2V", "other", "cogvideox-license"),
    ("THUDM/CogVideoX1.5-5B", "other", "cogvideox-license"),
    ("someone/fine-tuned-vae", None, None),
])
def test_model_card_base_model_and_licence(source, license, license_name):
    card = ModelCard(model_card_text("me/x", dict(TINY_CONFIG, latent_channels=4),
                                     {"source": {"source_id": source, "revision": SHA, "is_hub": True}}))
    assert card.data.base_model == source
    assert card.data.license == license
    assert card.data.get("license_name") == license_name
    assert source in card.text and SHA in card.text


@pytest.mark.parametrize("subfolder,expected", [
    ("vae_x", f" --reference-revision {SHA} --reference-subfolder vae_x   #"),
    ("vae", f" --reference-revision {SHA}   #"),
    ("", f" --reference-revision {SHA}   #"),  # a VAE-only repo: the VAE at its root
])
def test_the_cards_verify_line_names_the_subfolder_the_vae_was_converted_from(subfolder, expected):
    """A pipeline whose VAE is not in vae/ (cogvae-convert --subfolder vae_x): the card's verify
    line must read the same subfolder of the base, or it fails with 'no vae/config.json'."""
    card = model_card_text("me/x", TINY_CONFIG, {"source": {"id": SOURCE, "revision": SHA, "is_hub": True,
                                                            "subfolder": subfolder}})
    assert f"cogvae verify me/x --reference {SOURCE}{expected}" in card


def test_the_cards_verify_line_names_the_variant_the_vae_was_converted_from():
    """Converted with --variant fp16: the card's verify line compares with the base's fp16 weights
    (without --reference-variant a base holding only fp16 weights has none to compare, and one
    holding both would be compared by its fp32 weights)."""
    card = model_card_text("me/x", TINY_CONFIG, {"source": {"id": SOURCE, "revision": SHA, "is_hub": True,
                                                            "subfolder": "vae", "variant": "fp16"}})
    assert f"cogvae verify me/x --reference {SOURCE} --reference-revision {SHA} --reference-variant fp16   #" in card


def test_the_cards_load_line_keeps_its_comment_apart_for_a_long_branch_name():
    card = model_card_text("me/x", TINY_CONFIG, {"source": SOURCE, "revision": SHA, "is_hub": True},
                           revision="finetune-2026-v2-long")
    assert 'vae = load(REPO_ID, revision="finetune-2026-v2-long") # fetches one format' in card
    assert "vae = load(REPO_ID, revision=" in model_card_text("me/x", TINY_CONFIG, {}, revision="ft")
    assert "vae = load(REPO_ID)                          # fetches" in model_card_text("me/x", TINY_CONFIG, {})


def test_a_fine_tune_of_a_variant_conversion_keeps_the_variant_in_its_cards_verify_line(ckpt, tmp_path):
    """save(model, out, base=<a local checkpoint converted with --variant fp16 from a Hub repo>):
    the fine-tune's card compares with the base's fp16 weights (and subfolder), as the converted
    checkpoint's own card does; the variant was dropped on the way."""
    from cogvae.converter import load, save
    from cogvae.converter.checkpoint import read_checkpoint, write_checkpoint

    config, params, _ = read_checkpoint(ckpt, format="msgpack")
    prov = json.loads((ckpt / "provenance.json").read_text())
    prov["source"] |= {"variant": "fp16", "subfolder": "vae_x"}
    base = write_checkpoint(tmp_path / "base", params, config, formats=("msgpack",), provenance=prov)
    save(load(base), tmp_path / "ft", base=base, validate=False, formats="msgpack")
    card = model_card_text("me/ft", TINY_CONFIG, json.loads((tmp_path / "ft" / "provenance.json").read_text()))
    assert (f"cogvae verify me/ft --reference {SOURCE} --reference-revision {SHA} --reference-subfolder vae_x "
            "--reference-variant fp16   #") in card


def test_model_card_of_a_local_source_has_no_base_model():
    card = ModelCard(model_card_text("me/x", {}, {"source": "/data/CogVideoX-2b"}))
    assert card.data.base_model is None and card.data.license is None
    assert "local diffusers folder" in card.text


def test_a_saved_fine_tune_keeps_base_model_and_licence(ckpt, tmp_path):
    """A model loaded from the converted checkpoint and written back by ``save(vae, out, base=ckpt)``:
    its card names that checkpoint's Hub source as base_model and keeps its licence.
    Fake: RecordingApi stands in for the Hub (no network)."""
    from cogvae.converter import load, save

    save(load(ckpt), tmp_path / "ft", base=ckpt, validate=False)
    api = RecordingApi(tmp_path)
    push_checkpoint(tmp_path / "ft", "me/ft", api=api)
    card = ModelCard.load(api.uploaded / "README.md")
    assert card.data.base_model == SOURCE and card.data.license_name == "cogvideox-license"
    assert "a model saved from JAX (`cogvae.converter.save`), based on" in card.text
    assert f"at commit `{SHA}`" in card.text
    card = ModelCard(model_card_text("me/x", {}, json.loads((tmp_path / "ft" / "provenance.json").read_text())
                                     | {"base": None, "source": {"id": "<in-memory model>", "is_hub": False,
                                                                 "saved_from": "<in-memory model>"}}))
    assert card.data.base_model is None and "based on" not in card.text


def test_convert_push_to_hub_passes_push_revision_and_token(tmp_path, monkeypatch):
    """cogvae-convert --push-to-hub ... --push-revision B: the branch reaches the commit.

    Faked, and why: no network and no real Hub writes, so create_repo / create_branch /
    list_repo_files / create_commit are patched on the real huggingface_hub.HfApi class
    (recording). The source is the embedded tiny VAE, converted for real; --revision stays the
    *source* revision option."""
    import huggingface_hub
    import huggingface_hub.constants
    from click.testing import CliRunner

    from cogvae.converter.cli import convert_command

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # faked online, whatever the env

    seen = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: seen.append(("create_repo", self.token, repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch",
                        lambda self, repo_id, **kw: seen.append(("create_branch", self.token, repo_id, kw)))

    def create_commit(self, **kw):
        seen.append(("create_commit", self.token, kw["repo_id"], kw))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{'f' * 40}",
                               oid="f" * 40, pr_url=None)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", _head_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: [])
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    r = CliRunner().invoke(convert_command, ["--out", str(tmp_path / "ckpt"), "--no-validate", "-q",
                                             "--push-to-hub", "me/x", "--push-revision", "flax",
                                             "--token", "hf_not_a_real_token"])
    assert r.exit_code == 0, r.output
    calls = {c[0]: c for c in seen}
    assert calls["create_branch"][1:3] == ("hf_not_a_real_token", "me/x")
    assert calls["create_branch"][3]["branch"] == "flax"
    assert calls["create_commit"][3]["revision"] == "flax" and calls["create_commit"][1] == "hf_not_a_real_token"


def test_push_revision_needs_push_to_hub(tmp_path):
    from click.testing import CliRunner

    from cogvae.converter.cli import convert_command

    r = CliRunner().invoke(convert_command, ["--out", str(tmp_path / "o"), "--push-revision", "x"])
    assert r.exit_code == 2 and "--push-revision" in r.output


def test_push_command_reports_what_it_removed(ckpt, monkeypatch):
    """`cogvae push` over an earlier checkpoint says how many of its files the commit removed.
    Faked, and why: no network, so create_repo / list_repo_files / create_commit are patched on the
    real huggingface_hub.HfApi class (the repo holds one stale Orbax data file)."""
    import huggingface_hub
    import huggingface_hub.constants
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # faked online, whatever the env

    commits = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", _head_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo_id, **kw: [".gitattributes", "orbax/d/0123abcd"])
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, **kw: commits.append(kw) or SimpleNamespace(
        commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{'a' * 40}", oid="a" * 40, pr_url=None))
    r = CliRunner().invoke(cli, ["push", str(ckpt), "me/x", "--token", "hf_not_a_real_token"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"uploaded {len(_files(ckpt)) + 1} file(s) to me/x, removed 1 file(s) of the "
                               "previous checkpoint: https://huggingface.co/me/x/commit/")
    assert len(commits) == 1


# ----------------------------------------------------------------------------------------
# fine-tunes: what the card of save(..., base=) names, and the card's code
# ----------------------------------------------------------------------------------------

SHA_JAX = "b" * 40
JAX_REPO = "me/vae-jax"
#: the only files save(..., base=<repo id>) may fetch: never weights
SMALL_FILES = {"COMPLETE", "config.json", "provenance.json", "model_index.json", "vae/config.json"}


def _offline(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def _uploaded_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub_repos(ckpt, tmp_path_factory):
    """A Hub cache holding the diffusers repo SOURCE (from the ``ckpt`` fixture) and JAX_REPO, the
    ``ckpt`` checkpoint as ``push_checkpoint`` uploads it (README.md included) at commit SHA_JAX;
    plus local bases: a copy of ``ckpt`` whose provenance.json has the flat layout, and a fine-tune
    saved with ``base=JAX_REPO``.

    Faked, and why: no network. The push goes to RecordingApi, and the files it would upload are
    put into a real Hub cache (huggingface_hub's layout, see ``_hubcache``) under JAX_REPO, as a
    download of the pushed repo would leave them; huggingface_hub's HF_HUB_OFFLINE / HF_HUB_CACHE
    constants point at that cache while it is read (they are read at import time)."""
    from cogvae.converter import load, save
    from cogvae.converter.checkpoint import read_checkpoint, write_checkpoint

    base = tmp_path_factory.mktemp("fine-tunes")
    cache = base / "hub"
    shutil.copytree(ckpt.parent / "hub", cache, symlinks=True)
    api = RecordingApi(base / "push")
    push_checkpoint(ckpt, JAX_REPO, api=api)
    add_snapshot(cache, JAX_REPO, _uploaded_files(api.uploaded), commit=SHA_JAX)
    config, params, _ = read_checkpoint(ckpt, format="msgpack")
    flat = write_checkpoint(base / "flat", params, config, formats=("msgpack",),
                            provenance={"source": SOURCE, "revision": SHA, "is_hub": True})
    model = load(ckpt)
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, cache)
        save(model, base / "ft-of-jax-repo", base=JAX_REPO, validate=False, formats="msgpack")
    return dict(cache=cache, model=model, flat=flat, ft_of_jax_repo=base / "ft-of-jax-repo")


def _push_card(folder: Path, tmp: Path, repo_id: str = "me/ft") -> tuple[ModelCard, str]:
    """The card and commit message a push of ``folder`` makes (RecordingApi: no network)."""
    api = RecordingApi(tmp)
    push_checkpoint(folder, repo_id, api=api)
    return ModelCard.load(api.uploaded / "README.md"), api.calls[-1][2]["commit_message"]


@pytest.mark.parametrize("kind,base_model,base_revision", [
    ("hub-checkpoint", JAX_REPO, SHA_JAX),    # a checkpoint pushed by cogvae push, by repo id
    ("hub-diffusers", SOURCE, SHA),           # the diffusers repo, by repo id
    ("local-checkpoint", SOURCE, None),       # the converted checkpoint folder
    ("flat-provenance", SOURCE, None),        # a checkpoint whose provenance.json is flat
    ("local-of-hub-checkpoint", JAX_REPO, None),  # a local fine-tune of JAX_REPO
])
def test_a_fine_tune_names_its_base_and_keeps_the_root_licence(ckpt, hub_repos, tmp_path, monkeypatch, kind,
                                                               base_model, base_revision):
    """``save(model, out, base=...)`` then push: the card's base_model is the nearest Hub repo among
    the model's ancestors (JAX_REPO itself when the base is that repo), a Hub base's commit is
    recorded, and the licence is the one of SOURCE, the model its weights were first converted
    from, whatever the chain. A Hub base is read from the Hub cache, small files only.
    Faked: the Hub is the offline cache of ``hub_repos`` (no network); snapshot_download is wrapped
    to record what each request asks for (the real one runs); the push goes to RecordingApi."""
    import huggingface_hub

    from cogvae.converter import save

    _offline(monkeypatch, hub_repos["cache"])
    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: asked.append(kw) or real(**kw))
    base = {"hub-checkpoint": JAX_REPO, "hub-diffusers": SOURCE, "local-checkpoint": ckpt,
            "flat-provenance": hub_repos["flat"], "local-of-hub-checkpoint": hub_repos["ft_of_jax_repo"]}[kind]
    save(hub_repos["model"], tmp_path / "ft", base=base, validate=False, formats="msgpack")
    prov = json.loads((tmp_path / "ft" / "provenance.json").read_text())
    assert prov["base"]["id"] == str(base) and prov["base"]["revision"] == base_revision
    assert prov["source"]["origin"] == {"id": SOURCE, "revision": SHA, "is_hub": True}
    assert all(set(kw["allow_patterns"]) <= SMALL_FILES for kw in asked), asked  # never the weights
    assert bool(asked) == kind.startswith("hub-")

    card, message = _push_card(tmp_path / "ft", tmp_path / "push")
    assert card.data.base_model == base_model
    assert (card.data.license, card.data.get("license_name")) == ("other", "cogvideox-license")
    assert f"[`{base_model}`](https://huggingface.co/{base_model})" in card.text
    assert f"The weights keep the licence of the source model, [`{SOURCE}`]" in card.text
    if base_model == JAX_REPO:
        assert f"first converted from [`{SOURCE}`](https://huggingface.co/{SOURCE}) at commit `{SHA}`" in card.text
    if base_revision:
        assert f"at commit `{base_revision}`" in card.text
    assert message == f"Upload CogVideoX VAE saved from JAX by cogvae, based on {base_model}"


def test_a_hub_base_at_a_branch_records_that_branchs_commit(hub_repos, tmp_path, monkeypatch):
    """``save(..., base=JAX_REPO, base_revision="ft-v2")`` reads the base's small files at that
    branch and records its commit, which the card then names; main is not asked for.
    Faked: the Hub is an offline copy of ``hub_repos``' cache with a second commit of JAX_REPO on
    branch ft-v2 (no network); the push goes to RecordingApi."""
    import huggingface_hub

    from cogvae.converter import save

    cache = tmp_path / "hub"
    shutil.copytree(hub_repos["cache"], cache, symlinks=True)
    snap = cache / ("models--" + JAX_REPO.replace("/", "--")) / "snapshots" / SHA_JAX
    branch = "c" * 40
    add_snapshot(cache, JAX_REPO, {rel: snap / rel for rel in ("COMPLETE", "config.json", "provenance.json")},
                 commit=branch, refs=("ft-v2",))
    _offline(monkeypatch, cache)
    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: asked.append(kw) or real(**kw))
    save(hub_repos["model"], tmp_path / "ft", base=JAX_REPO, base_revision="ft-v2", validate=False,
         formats="msgpack")
    assert [kw["revision"] for kw in asked] == ["ft-v2"]
    prov = json.loads((tmp_path / "ft" / "provenance.json").read_text())
    assert prov["base"]["id"] == JAX_REPO and prov["base"]["revision"] == branch
    card, _ = _push_card(tmp_path / "ft", tmp_path / "push")
    assert card.data.base_model == JAX_REPO and f"at commit `{branch}`" in card.text


@pytest.mark.parametrize("base,revision,message", [
    ("local", "ft-v2", r"base_revision='ft-v2' is for a Hub repo id, but base .* is a local folder"),
    (None, "ft-v2", r"base_revision names a revision of a Hub base: pass base= too"),
    (JAX_REPO, "", r"base_revision must be a non-empty branch, tag or commit, got ''"),
])
def test_a_base_revision_without_a_hub_base_is_refused(ckpt, tmp_path, base, revision, message):
    """A revision only means something for a Hub base: refused before any work, nothing written.
    No Hub involved."""
    from cogvae.converter import load, save

    with pytest.raises(ValueError, match=message):
        save(load(ckpt), tmp_path / "ft", base=ckpt if base == "local" else base, base_revision=revision)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("kind", ["no-base", "saved-checkpoint", "diffusers-folder"])
def test_a_fine_tune_without_a_hub_origin_is_described_truly(tmp_path, kind):
    """A save with no base, with a base saved without one (a chain of local fine-tunes), or with
    a local diffusers folder as base: the card and the commit message say what it is, never
    "a local diffusers folder (`<in-memory model>`)". No Hub: pushed to RecordingApi."""
    from cogvae.converter import load, save
    from cogvae.converter.convert import default_source

    vae = load(default_source())
    base = None
    if kind == "saved-checkpoint":
        base = tmp_path / "ft0"
        save(vae, base, validate=False, formats="msgpack")
    elif kind == "diffusers-folder":
        base = default_source()
    save(vae, tmp_path / "ft", base=base, validate=False, formats="msgpack")
    card, message = _push_card(tmp_path / "ft", tmp_path / "push")
    saved = "from a model saved from JAX (`cogvae.converter.save`)"
    expected = {"no-base": f"{saved}.",
                "saved-checkpoint": f"{saved}, based on a local cogvae checkpoint (`{base}`).",
                "diffusers-folder": f"{saved}, based on a local diffusers folder (`{base}`)."}[kind]
    assert expected in " ".join(card.text.split())
    assert "<in-memory model>" not in card.text and "<in-memory model>" not in message
    assert card.data.base_model is None and card.data.license is None
    assert message == "Upload CogVideoX VAE saved from JAX by cogvae" + (f", based on {base}" if base else "")


@pytest.mark.parametrize("which,with_diffusers,branch", [("converted", True, None), ("fine-tune", False, None),
                                                         ("converted", True, "ft")])
def test_every_code_block_of_the_card_runs(ckpt, hub_repos, tmp_path, monkeypatch, which, with_diffusers, branch):
    """Every code block of the pushed card runs as written: the Python blocks exec'd (their
    imports only), the shell lines run through the real `cogvae` command group (exit 0).
    ``branch``: pushed to that branch (``--revision ft``) of a repo with no main branch, so code
    that reads main (the card's before it named the branch) fails.
    Faked, and why: no network, so the pushed files (RecordingApi) are put into a copy of the
    ``hub_repos`` Hub cache under the card's repo id, offline (huggingface_hub's constants patched;
    diffusers reads its own offline switch at import time, so it is patched too), and the card's
    `load(REPO_ID)` / `from_pretrained(...)` / `cogvae verify REPO_ID` resolve from there."""
    import shlex

    import diffusers.utils.constants
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    cache = tmp_path / "hub"
    shutil.copytree(hub_repos["cache"], cache, symlinks=True)
    folder = ckpt if which == "converted" else hub_repos["ft_of_jax_repo"]
    # The base's main branch has moved on since the weights were taken from it: the card's verify
    # line must still compare with the commit they came from.
    base_repo, base_commit = (SOURCE, SHA) if which == "converted" else (JAX_REPO, SHA_JAX)
    snap = cache / ("models--" + base_repo.replace("/", "--")) / "snapshots" / base_commit
    add_snapshot(cache, base_repo, {p.relative_to(snap).as_posix(): p.resolve() for p in snap.rglob("*")
                                    if p.is_file()}, commit="f" * 40)
    api = RecordingApi(tmp_path / "push")
    card = push_checkpoint(folder, "me/card", api=api, with_diffusers=with_diffusers, revision=branch)["model_card"]
    add_snapshot(cache, "me/card", _uploaded_files(api.uploaded), commit="e" * 40, refs=(branch or "main",))
    _offline(monkeypatch, cache)
    monkeypatch.setattr(diffusers.utils.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.chdir(tmp_path)

    import re

    python = re.findall(r"```python\n(.*?)```", card, re.S)
    shell = re.findall(r"```bash\n(.*?)```", card, re.S)
    assert len(python) == 1 + with_diffusers and len(shell) == 1
    for block in python:
        exec(compile(block, "<model card>", "exec"), {})  # noqa: S102 - the card's own code
    for line in shell[0].splitlines():
        args = shlex.split(line, comments=True)
        assert args[0] == "cogvae", line
        r = CliRunner().invoke(cli, args[1:])
        assert r.exit_code == 0, (line, r.output)
        if branch:
            assert f"--revision {branch}" in line
        if "--reference" in args:
            assert f"reference: {base_repo} (" in r.output and f"Hub snapshot {base_commit}" in r.output


@pytest.mark.parametrize("provenance,expected", [
    # flat, as push's card has always accepted it
    ({"source": SOURCE, "revision": SHA, "is_hub": True}, (SOURCE, SHA, True, SOURCE)),
    # nested, as cogvae-convert writes it
    ({"source": {"id": SOURCE, "revision": SHA, "is_hub": True, "files": []}}, (SOURCE, SHA, True, SOURCE)),
    ({"source": {"source_id": "/data/vae", "is_hub": False}}, ("/data/vae", None, False, "/data/vae")),
    # save's, with the model first converted from
    ({"source": {"id": JAX_REPO, "revision": SHA_JAX, "is_hub": True, "saved_from": "<in-memory model>",
                 "origin": {"id": SOURCE, "revision": SHA, "is_hub": True}}}, (JAX_REPO, SHA_JAX, True, SOURCE)),
    # save's without a base (and what save wrote before base ids were resolved)
    ({"source": {"id": "<in-memory model>", "is_hub": False, "saved_from": "<in-memory model>"}},
     (None, None, False, None)),
    ({"source": {"id": None, "is_hub": None, "checkpoint": "/x", "saved_from": "<in-memory model>"}},
     (None, None, False, None)),
    ({}, (None, None, False, None)),
])
def test_one_provenance_parser_for_every_layout(provenance, expected):
    from cogvae.converter.push import _source_of, provenance_origin

    o = provenance_origin(provenance)
    assert (o["id"], o["revision"], o["is_hub"], o["root"]["id"]) == expected
    assert _source_of(provenance) == expected[:3]


# ----------------------------------------------------------------------------------------
# a push that cannot succeed is refused before any work; what a push prints
# ----------------------------------------------------------------------------------------


def _fake_hfapi_class(monkeypatch, *, remote=(), pr: bool = False) -> list[dict]:
    """Patch the network methods of the real ``huggingface_hub.HfApi`` class with recorders (no
    network, never the real Hub); a commit answers like the Hub (a PR URL for ``create_pr``).
    Offline mode is pinned off (a real push refuses it) and no token needs to be logged in.
    Returns the list the commits are recorded in."""
    import huggingface_hub
    import huggingface_hub.constants

    commits: list[dict] = []

    def create_commit(self, **kw):
        commits.append(kw)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/{'a' * 40}", oid="a" * 40,
                               pr_url=f"https://huggingface.co/{kw['repo_id']}/discussions/7" if pr else None)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", _head_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: list(remote))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return commits


def _no_work(monkeypatch):
    """Make any conversion or checkpoint check fail loudly, to prove a refusal comes first."""
    import cogvae.converter.convert as convert_mod
    import cogvae.converter.push as push_mod

    def boom(*a, **k):
        raise AssertionError("work was done before the push was refused")

    monkeypatch.setattr(convert_mod, "atomic_output_dir", boom)
    monkeypatch.setattr(convert_mod, "_resolve", boom)
    monkeypatch.setattr(push_mod, "_check_checkpoint", boom)


@pytest.mark.parametrize("repo_id", ["badid", "a/b/c", "", "./me/x"])
def test_a_malformed_repo_id_is_a_usage_error_before_any_work(ckpt, tmp_path, monkeypatch, repo_id):
    """`cogvae push CKPT badid` and `cogvae-convert --push-to-hub badid` (dry run or not, --json or
    not): exit 2 (a usage error, not a Hub error), one `Error:` line, nothing on stdout, nothing
    converted or hashed; the Python API raises PushUsageError, a PushError.
    Faked, and why: convert's output/resolve steps and push's checkpoint check are replaced by
    functions that fail the test, to prove the id is refused before them; no Hub is needed, as
    nothing may reach it."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli, convert_command
    from cogvae.converter.convert import convert
    from cogvae.converter.push import PushUsageError

    assert issubclass(PushUsageError, PushError)
    _no_work(monkeypatch)
    for dry_run in (True, False):
        with pytest.raises(PushUsageError, match="not a Hub repo id"):
            push_checkpoint(ckpt, repo_id, dry_run=dry_run)
        with pytest.raises(PushUsageError, match="not a Hub repo id"):
            convert(None, tmp_path / "o", push_to_hub=repo_id, dry_run=dry_run, quiet=True)
        for extra in ([], ["--json"]):
            flags = (["--dry-run"] if dry_run else []) + extra
            r = CliRunner().invoke(cli, ["push", str(ckpt), repo_id, *flags])
            assert (r.exit_code, r.stdout) == (2, ""), r.output
            assert r.stderr.startswith("Usage: ") and r.stderr.endswith(
                f"\n\nError: {repo_id!r}: not a Hub repo id (expected 'org/name')\n"), r.stderr  # as any usage error
            r = CliRunner().invoke(convert_command, ["--out", str(tmp_path / "o"), "--no-validate",
                                                     "--push-to-hub", repo_id, *flags])
            assert (r.exit_code, r.stdout) == (2, ""), r.output
            assert r.stderr.startswith("Usage: ") and r.stderr.endswith(
                f"\n\nError: {repo_id!r}: not a Hub repo id (expected 'org/name')\n"), r.stderr  # as any usage error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("branch, why", [
    ("", "'' is not a branch name (leave it out to push to main)"),
    ("  ", "'  ' is not a branch name (leave it out to push to main)"),
    ("ft v2", "'ft v2' is not a valid branch name (git refuses ' ' in one)"),
    ("a..b", "'a..b' is not a valid branch name (git refuses '..' in one)"),
    ("x.lock", "'x.lock' is not a valid branch name (git refuses a part of one ending with '.lock')"),
    ("-x", "'-x' is not a valid branch name (git refuses one starting with '-')"),
    # git takes it, but the Hub's clients read it as a commit: the card's commands failed
    ("b" * 40, f"'{'b' * 40}' is not a usable branch name (40 hex digits: the Hub and huggingface_hub read it "
               "as a commit sha, so the card's commands could not reach the branch)"),
])
def test_a_branch_that_is_none_is_a_usage_error_before_any_work(ckpt, tmp_path, monkeypatch, branch, why):
    """`--revision ""` (a CI line's unset $BRANCH) pushed to main, and a name git refuses was
    written into the card and sent to create_branch. Both are refused first, as a malformed repo
    id is: exit 2 with click's usage line, in `cogvae push --revision` and `cogvae-convert
    --push-revision` alike; the Python API raises PushUsageError naming its argument. Faked, as
    above: the first steps of the work fail the test if reached."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli, convert_command
    from cogvae.converter.convert import convert
    from cogvae.converter.push import PushUsageError

    _no_work(monkeypatch)
    for dry_run in (True, False):
        with pytest.raises(PushUsageError) as e:
            push_checkpoint(ckpt, "me/x", revision=branch, dry_run=dry_run)
        assert str(e.value) == f"revision: {why}"
        with pytest.raises(PushUsageError) as e:
            convert(None, tmp_path / "o", push_to_hub="me/x", push_revision=branch, dry_run=dry_run, quiet=True)
        assert str(e.value) == f"push_revision: {why}"
        flags = ["--dry-run"] if dry_run else []
        for command, argv, option in (
                (cli, ["push", str(ckpt), "me/x", "--revision", branch, *flags], "--revision"),
                (convert_command, ["--out", str(tmp_path / "o"), "--push-to-hub", "me/x", "--push-revision", branch,
                                   *flags], "--push-revision")):
            r = CliRunner().invoke(command, argv)
            assert (r.exit_code, r.stdout) == (2, ""), r.output
            assert r.stderr.endswith(f"\nError: Invalid value for '{option}': {why}\n"), r.stderr
    assert not (tmp_path / "o").exists()
    from cogvae.converter.push import branch_problem

    assert [branch_problem(b) for b in ("ft-v2", "feat/x", "v1.0", "main", "ft_2026.11")] == [None] * 5


BRANCHES = ["ft-v2", "feat/x", "v1.0", "main", "ft_2026.11", "feat-x", "a.b/c", "a@b", "x.locked", "lock",
            "ft v2", "a..b", "x.lock", "a.lock/b", "a/b.lock/c", "-x", "x/", "/x", "a//b", "a/b.", "x.", ".x", "a/.b",
            "@", "a@{b", "a~1", "a^", "a:b", "a?", "a*", "a[b", "a\\b", "a\tb", "a\x7fb"]


def test_branch_names_are_judged_as_git_judges_them():
    """Nothing faked: git itself (`git check-ref-format --branch`, which the Hub's branches obey)
    is the reference for every name, valid and not; each refusal names the rule it breaks."""
    from cogvae.converter.push import branch_problem

    for name in BRANCHES:
        git = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True)
        assert (branch_problem(name) is None) == (git.returncode == 0), (name, branch_problem(name))
    assert branch_problem("a.lock/b") == "'a.lock/b' is not a valid branch name (git refuses a part of one " \
                                         "ending with '.lock')"
    assert branch_problem("x/") == "'x/' is not a valid branch name (git refuses one starting or ending with '/')"
    assert branch_problem("a/b.") == "'a/b.' is not a valid branch name (git refuses one ending with '.')"


@pytest.mark.parametrize("case", ["no-token", "offline"])
def test_a_real_push_without_token_or_in_offline_mode_is_refused_before_any_work(ckpt, tmp_path, monkeypatch, case):
    """A real push with no token (none passed, none logged in) or in offline mode is refused first:
    `cogvae-convert --push-to-hub` converts nothing, `cogvae push` hashes nothing (exit 5, one
    `Error:` line); a dry run needs neither (it calls no API).
    Faked, and why: huggingface_hub.get_token returns None (no login on this machine) or its
    HF_HUB_OFFLINE constant is set (read at import time); convert's and push's first steps are
    replaced by functions that fail the test, to prove the refusal comes before them. Nothing can
    reach the Hub: the real HfApi refuses in offline mode, and the token check comes before it."""
    import huggingface_hub
    import huggingface_hub.constants
    from click.testing import CliRunner

    from cogvae.converter.cli import cli, convert_command
    from cogvae.converter.convert import convert

    if case == "no-token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        tok, message = None, "no Hugging Face token: run `hf auth login` or set HF_TOKEN"
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        tok, message = "hf_not_a_real_token", "me/x: cannot push in offline mode (HF_HUB_OFFLINE=1 is set)"
    token = ["--token", tok] if tok else []
    with monkeypatch.context() as mp:
        _no_work(mp)
        with pytest.raises(PushError, match=re.escape(message)):
            convert(None, tmp_path / "o", push_to_hub="me/x", token=tok, quiet=True)
        with pytest.raises(PushError, match=re.escape(message)):
            push_checkpoint(ckpt, "me/x", token=tok)
        for argv in (["push", str(ckpt), "me/x", *token], ["push", str(ckpt), "me/x", "--json", *token]):
            r = CliRunner().invoke(cli, argv)
            assert (r.exit_code, r.stdout, r.stderr) == (5, "", f"Error: {message}\n"), r.output
        for extra in ([], ["--json"], ["--create-pr"]):
            r = CliRunner().invoke(convert_command, ["--out", str(tmp_path / "o"), "--no-validate",
                                                     "--push-to-hub", "me/x", *token, *extra])
            assert (r.exit_code, r.stdout, r.stderr) == (5, "", f"Error: {message}\n"), r.output
    assert not (tmp_path / "o").exists()
    assert push_checkpoint(ckpt, "me/x", dry_run=True)["dry_run"] is True  # a dry run needs neither


def _dry_run_listing(stdout: str, files: dict[str, int], repo_id: str) -> None:
    """A dry run's text lists every file with its size (and the total), the card included."""
    total = sum(files.values())
    lines = stdout.splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith(f"would upload {len(files)} file(s), ")]
    assert len(head) == 1 and lines[head[0]].endswith(f" to {repo_id}:"), stdout
    listed = {}
    for line in lines[head[0] + 1:head[0] + 1 + len(files)]:
        size, path = line.split()
        listed[path] = int(size.replace(",", ""))
    assert listed == files
    assert lines[head[0] + 1 + len(files)].split() == [f"{total:,}", "bytes", "in", "all"]
    assert lines[-1].startswith("dry run: nothing uploaded")


def test_push_dry_run_text_lists_every_file_with_its_size(ckpt, monkeypatch):
    """`cogvae push CKPT me/x --dry-run` lists what would be uploaded: every file with its size, and
    the total (not just a count); --json stays one JSON document on stdout.
    Faked, and why: huggingface_hub.HfApi is replaced by a function that fails the test and
    get_token returns None: a dry run must neither build an API nor need a token (no network)."""
    import huggingface_hub
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("a dry run built an HfApi"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    r = CliRunner().invoke(cli, ["push", str(ckpt), "me/x", "--dry-run"])
    assert r.exit_code == 0, r.output
    card = push_checkpoint(ckpt, "me/x", dry_run=True)["model_card"]
    _dry_run_listing(r.stdout, {**_files(ckpt), "README.md": len(card.encode())}, "me/x")
    r = CliRunner().invoke(cli, ["push", str(ckpt), "me/x", "--dry-run", "--json"])
    assert r.exit_code == 0 and r.stderr == ""
    assert {f["path"] for f in json.loads(r.stdout)["files"]} == {*_files(ckpt), "README.md"}


@pytest.mark.parametrize("quiet", [False, True])
def test_convert_push_dry_run_text_lists_every_file(tmp_path, monkeypatch, quiet):
    """`cogvae-convert --out X --push-to-hub me/x --dry-run` lists, after the output folder, every
    file that would be uploaded with its size and the total (also with --quiet: it is the result,
    not progress); with --json stdout is one JSON document holding the same list.
    Faked, and why: huggingface_hub.HfApi is replaced by a function that fails the test and
    get_token returns None (a dry run calls no API and needs no token; no network). The source is
    the embedded tiny VAE, converted for real without validation (fast)."""
    import huggingface_hub
    from click.testing import CliRunner

    from cogvae.converter.cli import convert_command

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("a dry run built an HfApi"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(convert_command, ["--out", str(out), "--no-validate", "--push-to-hub", "me/x",
                                             "--dry-run", *(["-q"] if quiet else [])])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("would upload" if quiet else f"{out}\nwould upload")
    card = push_checkpoint(out, "me/x", dry_run=True)["model_card"]
    _dry_run_listing(r.stdout, {**_files(out), "README.md": len(card.encode())}, "me/x")
    r = CliRunner().invoke(convert_command, ["--out", str(tmp_path / "j"), "--no-validate", "-q", "--json",
                                             "--push-to-hub", "me/x", "--dry-run"])
    assert r.exit_code == 0 and r.stderr == ""
    push = json.loads(r.stdout)["push"]
    assert push["dry_run"] is True and {f["path"] for f in push["files"]} == {*_files(tmp_path / "j"), "README.md"}


@pytest.mark.parametrize("create_pr", [False, True])
def test_convert_push_prints_the_commit_or_pull_request_url(tmp_path, monkeypatch, create_pr):
    """`cogvae-convert --push-to-hub me/x` (and `--create-pr`) says where the push went: the commit
    URL (the pull request's URL for --create-pr) and how many files of the previous checkpoint it
    removed; `cogvae push --create-pr` names the pull request too.
    Faked, and why: the network methods of the real huggingface_hub.HfApi class are patched with
    recorders (no network, never the real Hub); the repo holds one stale Orbax data file."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli, convert_command

    commits = _fake_hfapi_class(monkeypatch, remote=[".gitattributes", "orbax/d/0123abcd"], pr=create_pr)
    out = tmp_path / "ckpt"
    pr = ["--create-pr"] if create_pr else []
    r = CliRunner().invoke(convert_command, ["--out", str(out), "--no-validate", "-q", "--push-to-hub", "me/x",
                                             "--token", "hf_not_a_real_token", *pr])
    assert r.exit_code == 0, r.output
    n = len(_files(out)) + 1
    url = "https://huggingface.co/me/x/" + ("discussions/7" if create_pr else f"commit/{'a' * 40}")
    where = "me/x as a pull request (base: main)" if create_pr else "me/x"
    expected = f"uploaded {n} file(s) to {where}, removed 1 file(s) of the previous checkpoint: {url}\n"
    assert r.stdout == expected
    assert len(commits) == 1 and commits[0]["create_pr"] is create_pr
    r = CliRunner().invoke(cli, ["push", str(out), "me/x", "--token", "hf_not_a_real_token", *pr])
    assert (r.exit_code, r.stdout) == (0, expected), r.output


# ----------------------------------------------------------------------------------------
# what a push uploads: the manifest's files only; local input problems are exit 3
# ----------------------------------------------------------------------------------------


def _listed(folder: Path) -> set[str]:
    """The files a push of ``folder`` may upload from it: those its COMPLETE lists, and COMPLETE."""
    return {*json.loads((folder / "COMPLETE").read_text())["files"], "COMPLETE"}


def _stray(folder: Path, outside: Path, kind: str) -> str:
    """Put one thing that is not part of the checkpoint into ``folder``; its path there."""
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("HF_TOKEN=hf_secret\n")
    rel = {"hidden": ".env", "unlisted": "notes.txt",
           "symlink-out": "link_secret", "symlinked-folder": "ext"}[kind]
    if kind == "symlink-out":
        (folder / rel).symlink_to(outside / "secret.txt")
    elif kind == "symlinked-folder":
        (folder / rel).symlink_to(outside, target_is_directory=True)
    else:
        (folder / rel).write_text("HF_TOKEN=hf_secret\n")
    return rel


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("kind", ["hidden", "unlisted", "symlink-out", "symlinked-folder"])
def test_push_uploads_only_the_files_the_manifest_lists(ckpt, tmp_path, kind, dry_run):
    """A hidden file (a `.env` holding a token), a file the COMPLETE manifest does not list (at the
    root), a symlink to a file outside the folder, a symlink to a folder outside: none is uploaded
    or listed as uploaded, and the result names it under ``not_uploaded`` (an unlisted file under
    orbax/ is refused instead: see test_a_push_of_a_checkpoint_load_would_refuse_is_refused). The commit holds exactly the listed files, COMPLETE
    and the card, byte for byte. Fake: RecordingApi stands in for the Hub (no network) and writes
    out what each add operation would upload, so no byte of the secret may appear in it."""
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder, symlinks=True)
    rel = _stray(folder, tmp_path / "outside", kind)
    api = RecordingApi(tmp_path)
    out = push_checkpoint(folder, "me/x", api=api, dry_run=dry_run)
    want = _listed(folder) | {"README.md"}
    assert {f["path"] for f in out["files"]} == want
    assert out.get("not_uploaded") == [rel]
    if dry_run:
        assert api.calls == []
        return
    assert set(_files(api.uploaded)) == want
    for path in _files(api.uploaded):
        assert b"hf_secret" not in (api.uploaded / path).read_bytes()
        if path != "README.md":
            assert (api.uploaded / path).read_bytes() == (folder / path).read_bytes()


@pytest.mark.parametrize("case", ["symlink-out", "symlink-in", "lists-readme"])
def test_a_listed_file_leading_outside_the_folder_is_refused(ckpt, tmp_path, case):
    """params.msgpack (listed in COMPLETE) replaced by a symlink to the same bytes outside the folder
    (its sha256 matches, so only the link betrays it): refused, naming the file, before any Hub
    call; a symlink to the same bytes inside the folder is pushed (content read, the link's target
    itself not uploaded, as COMPLETE does not list it). A manifest listing README.md, which push
    writes itself, is refused too (both a PushInputError: bad input, exit 3).
    Fake: RecordingApi stands in for the Hub (no network)."""
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    api = RecordingApi(tmp_path)
    if case == "lists-readme":
        import hashlib

        (folder / "README.md").write_text("mine\n")
        manifest = json.loads((folder / "COMPLETE").read_text())
        manifest["files"]["README.md"] = {"size": 5, "sha256": hashlib.sha256(b"mine\n").hexdigest()}
        (folder / "COMPLETE").write_text(json.dumps(manifest))
        with pytest.raises(PushError, match=re.escape(f"{folder / 'README.md'}: listed in the COMPLETE")) as e:
            push_checkpoint(folder, "me/x", api=api)
        assert type(e.value).__name__ == "PushInputError" and api.calls == []
        return
    where = tmp_path / "elsewhere" if case == "symlink-out" else folder / "blobs"
    where.mkdir()
    (folder / "params.msgpack").rename(where / "params.msgpack")
    (folder / "params.msgpack").symlink_to(where / "params.msgpack")
    if case == "symlink-out":
        with pytest.raises(PushError, match=re.escape(f"{folder / 'params.msgpack'}: a symlink leading "
                                                      "outside the checkpoint folder")) as e:
            push_checkpoint(folder, "me/x", api=api)
        assert type(e.value).__name__ == "PushInputError" and api.calls == []
        return
    out = push_checkpoint(folder, "me/x", api=api)
    assert set(_files(api.uploaded)) == _listed(folder) | {"README.md"}
    assert (api.uploaded / "params.msgpack").read_bytes() == (ckpt / "params.msgpack").read_bytes()
    assert out["not_uploaded"] == ["blobs/params.msgpack"]


@pytest.mark.parametrize("rel", [".gitattributes", "diffusion_pytorch_model.safetensors.index.json",
                                 "diffusion_pytorch_model.fp16.safetensors", "notes/readme.txt"])
def test_a_listed_file_a_checkpoint_never_writes_is_refused(ckpt, tmp_path, rel):
    """A manifest another tool wrote (self-consistent: sizes and hashes right) listing a file that
    no cogvae checkpoint has: it was uploaded, a .gitattributes replacing the repo's LFS rules, a
    diffusers index becoming what from_pretrained loads (without --with-diffusers, whose weights
    such a push deletes). Refused before any Hub call, dry run or not (bad input, exit 3).
    Fake: RecordingApi stands in for the Hub (no network)."""
    import hashlib

    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    (folder / rel).parent.mkdir(exist_ok=True)
    (folder / rel).write_bytes(b"{}\n")
    manifest = json.loads((folder / "COMPLETE").read_text())
    manifest["files"][rel] = {"size": 3, "sha256": hashlib.sha256(b"{}\n").hexdigest()}
    (folder / "COMPLETE").write_text(json.dumps(manifest))
    message = (f"{folder / rel}: listed in the COMPLETE manifest, but not a file of a cogvae checkpoint (config.json, "
               "provenance.json, params.msgpack, orbax/...); not pushed (convert the checkpoint again)")
    for dry_run in (True, False):
        api = RecordingApi(tmp_path)
        with pytest.raises(PushInputError) as e:
            push_checkpoint(folder, "me/x", api=api, dry_run=dry_run)
        assert str(e.value) == message and api.calls == []
    r = CliRunner().invoke(cli, ["push", str(folder), "me/x", "--dry-run"])
    assert (r.exit_code, r.stderr) == (3, f"Error: {message}\n"), r.output


def test_the_card_names_the_formats_the_upload_holds(ckpt, tmp_path):
    """A msgpack-only checkpoint whose provenance.json records no formats (written by
    write_checkpoint with another tool's provenance): the card listed orbax/ and said the loader
    fetches Orbax, though no orbax/ was uploaded. The formats now come from the manifest's files.
    Fake: nothing is uploaded (a dry run)."""
    from cogvae.converter.checkpoint import read_checkpoint, write_checkpoint

    config, params, _ = read_checkpoint(ckpt, format="msgpack")
    out = tmp_path / "nf"
    write_checkpoint(out, params, config, formats=("msgpack",), provenance={"source": SOURCE, "is_hub": True})
    from cogvae.converter.push import plan_upload

    files, card = plan_upload(out, "me/x")
    assert not any(f["path"].startswith("orbax/") for f in files)
    assert "params.msgpack" in card and "orbax/" not in card and "Orbax" not in card, card


def test_a_push_deletes_a_stale_repo_file_it_does_not_replace(ckpt, tmp_path):
    """The repo holds a previous push's Orbax data file that this checkpoint does not have: the
    commit deletes it (a stray orbax/ file breaks loading), and leaves the repo's other,
    non-checkpoint files alone. (A local orbax/ file the manifest does not list is refused before
    any upload, as load refuses the folder.)
    Fake: RecordingApi plays the Hub repo holding those files (no network)."""
    api = RecordingApi(tmp_path, remote=(".gitattributes", "orbax/d/0123abcd", "samples/clip.mp4"))
    out = push_checkpoint(ckpt, "me/x", api=api)
    assert api.deleted == out["deleted"] == ["orbax/d/0123abcd"]
    assert set(_files(api.uploaded)) == _listed(ckpt) | {"README.md"}


def test_push_dry_run_text_says_what_is_not_uploaded(ckpt, tmp_path, monkeypatch):
    """`cogvae push CKPT me/x --dry-run` over a folder holding a `.env` and a stray file: the
    listing has only the manifest's files and the card, then one line naming what is not
    uploaded, then the dry run's closing line; --json has the same under "not_uploaded".
    Faked, and why: huggingface_hub.HfApi is replaced by a function that fails the test and
    get_token returns None: a dry run must neither build an API nor need a token (no network)."""
    import huggingface_hub
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("a dry run built an HfApi"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "notes.txt").write_text("mine\n")
    r = CliRunner().invoke(cli, ["push", str(folder), "me/x", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[-2] == "not uploaded: 2 file(s) not in the COMPLETE manifest: .env, notes.txt"
    card = push_checkpoint(folder, "me/x", dry_run=True)["model_card"]
    sizes = {rel: (folder / rel).stat().st_size for rel in _listed(folder)}
    _dry_run_listing("\n".join(lines[:-2] + lines[-1:]), {**sizes, "README.md": len(card.encode())}, "me/x")
    r = CliRunner().invoke(cli, ["push", str(folder), "me/x", "--dry-run", "--json"])
    assert r.exit_code == 0 and r.stderr == ""
    assert json.loads(r.stdout)["not_uploaded"] == [".env", "notes.txt"]


def _bad_input(kind: str, ckpt: Path, tmp: Path, monkeypatch) -> tuple[Path, str]:
    """A local input a push must refuse as bad input, and the start of its error message."""
    if kind == "missing":
        return tmp / "no-such-folder", f"{tmp / 'no-such-folder'}: no such folder"
    if kind == "file":
        return ckpt / "params.msgpack", f"{ckpt / 'params.msgpack'}: not a folder"
    if kind == "diffusers-folder":
        folder = save_tiny_vae(tmp / "vae")
        return folder, f"{folder}: a diffusers VAE folder, not a converted checkpoint"
    folder = tmp / "ck"
    shutil.copytree(ckpt, folder)
    if kind == "corrupt":
        with open(folder / "config.json", "a") as f:
            f.write("garbage\n")
        return folder, f"{folder}: corrupt checkpoint: config.json: size"
    import os

    if kind == "unreadable-folder":  # what click (and push) ask the OS; root would read it anyway
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: Path(p) != folder and real(p, mode, *a, **k))
        return folder, f"{folder}: cannot read the folder (permission denied)"
    assert kind == "unreadable-file"
    import cogvae.converter.checkpoint as checkpoint

    real_sha = checkpoint._sha256

    def sha256(path):
        if Path(path).name == "params.msgpack":
            raise PermissionError(13, "Permission denied", str(path))
        return real_sha(path)

    monkeypatch.setattr(checkpoint, "_sha256", sha256)
    return folder, f"{folder / 'params.msgpack'}: cannot read: Permission denied"


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("kind", ["missing", "file", "diffusers-folder", "corrupt", "unreadable-folder",
                                  "unreadable-file"])
def test_a_bad_local_folder_is_exit_3_not_a_hub_error(ckpt, tmp_path, monkeypatch, kind, dry_run):
    """`cogvae push X me/x` (dry run or not, --json or not) where X is missing, a file, a diffusers
    folder, a checkpoint whose config.json no longer matches its manifest, an unreadable folder or
    one with an unreadable file: exit 3 (bad input, as `export-diffusers`), not 5 (Hub error) nor
    click's 2, with one `Error:` line naming the path and nothing on stdout; the Python API raises
    PushInputError, a PushError.
    Faked, and why: the network methods of the real huggingface_hub.HfApi class are patched with
    recorders (no network; none may be called); tests run as root, whom chmod does not stop, so
    an unreadable folder is os.access answering no for it (what click and push ask) and an
    unreadable file the checkpoint's file hasher raising the PermissionError open() would."""
    from click.testing import CliRunner

    from cogvae.converter.cli import cli

    commits = _fake_hfapi_class(monkeypatch)
    folder, message = _bad_input(kind, ckpt, tmp_path, monkeypatch)
    flags = ["--dry-run"] if dry_run else ["--token", "hf_not_a_real_token"]
    for extra in ([], ["--json"]):
        r = CliRunner().invoke(cli, ["push", str(folder), "me/x", *flags, *extra])
        assert (r.exit_code, r.stdout) == (3, ""), r.output
        assert r.stderr.startswith(f"Error: {message}") and r.stderr.count("\n") == 1, r.stderr
    from cogvae.converter.push import PushInputError

    assert issubclass(PushInputError, PushError)
    with pytest.raises(PushInputError, match=re.escape(message)):
        push_checkpoint(folder, "me/x", dry_run=dry_run, token="hf_not_a_real_token")
    assert commits == []


@pytest.mark.parametrize("as_json", [False, True])
def test_a_push_that_fails_after_the_conversion_says_where_the_checkpoint_is(tmp_path, monkeypatch, as_json):
    """The upload fails (an HTTP 500 at the commit) after a finished conversion: the checkpoint is
    kept and complete, the one Error line says where it is and the `cogvae push` line that retries
    only the upload, and with --json the conversion's summary is still printed (push: ok false).
    Faked, and why: no network; HfApi's methods are patched on the real class (the commit raises
    huggingface_hub's own HfHubHTTPError, built on a real httpx2 response)."""
    import httpx2
    import huggingface_hub
    from click.testing import CliRunner
    from huggingface_hub.errors import HfHubHTTPError

    from cogvae.converter import load
    from cogvae.converter.cli import convert_command

    _fake_hfapi_class(monkeypatch)

    def failing_commit(self, **kw):
        request = httpx2.Request("POST", "https://huggingface.co/api/models/me/x/commit/main")
        raise HfHubHTTPError("500 Server Error: Internal Server Error", response=httpx2.Response(500, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", failing_commit)
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(convert_command, ["--out", str(out), "--no-validate", "-q", "--push-to-hub", "me/x",
                                             "--private", "--token", "hf_not_a_real_token"]
                           + (["--json"] if as_json else []))
    assert r.exit_code == 5, r.output
    retry = f"cogvae push {out} me/x --private"
    assert r.stderr.strip() == (f"Error: me/x: upload failed: 500 Server Error: Internal Server Error; the converted "
                                f"checkpoint is complete at {out}: retry the upload with `{retry}`")
    load(out)  # kept, complete
    if as_json:
        summary = json.loads(r.stdout)
        assert summary["ok"] is False and summary["out"] == str(out) and summary["files"]
        assert summary["push"]["ok"] is False and summary["push"]["retry"] == retry
    else:
        assert r.stdout == ""


@pytest.mark.parametrize("case", ["stray-file", "manifest-drops-a-data-file"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_push_of_a_checkpoint_load_would_refuse_is_refused(ckpt, tmp_path, case, dry_run):
    """A file in orbax/ that the manifest does not list: load refuses the folder (Orbax reads its
    whole folder). A push of the listed files alone would publish a repo that does not load when
    the manifest was edited to drop a data file Orbax needs, and one that load refuses locally
    otherwise: refused before any Hub call, naming the file."""
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    if case == "stray-file":
        rel = "orbax/stray"
        (d / rel).write_bytes(b"x")
    else:
        manifest = json.loads((d / "COMPLETE").read_text())
        rel = max((r for r in manifest["files"] if r.startswith("orbax/")), key=lambda r: manifest["files"][r]["size"])
        del manifest["files"][rel]
        (d / "COMPLETE").write_text(json.dumps(manifest))
    api = RecordingApi(tmp_path)
    with pytest.raises(PushInputError, match=rf"1 file\(s\) in orbax/ that its COMPLETE manifest does not list "
                                             rf"\(first: {rel}\): load refuses such a checkpoint; not pushed"):
        push_checkpoint(d, "me/x", api=api, dry_run=dry_run)
    assert api.calls == []


@pytest.mark.parametrize("quiet, tty, shown", [(False, True, True), (True, True, False), (False, False, False)])
def test_upload_progress_bars_follow_quiet_and_the_terminal(ckpt, tmp_path, monkeypatch, quiet, tty, shown):
    """huggingface_hub draws upload bars with carriage returns: hidden with --quiet and when stderr
    is not a terminal (a CI log), shown otherwise; the process-wide switch is put back after.
    Faked: RecordingApi records whether the bars were on while it committed (no network)."""
    import sys

    from huggingface_hub.utils import are_progress_bars_disabled

    seen = []

    class Api(RecordingApi):
        def create_commit(self, **kw):
            seen.append(not are_progress_bars_disabled())
            return super().create_commit(**kw)

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    before = are_progress_bars_disabled()
    push_checkpoint(ckpt, "me/x", api=Api(tmp_path), quiet=quiet)
    assert seen == [shown and not before] and are_progress_bars_disabled() is before
