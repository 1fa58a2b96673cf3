"""Publish a converted checkpoint folder to the Hugging Face Hub, with a generated model card.

``push_checkpoint`` checks that the folder is a complete converted checkpoint, then calls
``HfApi.create_repo(exist_ok=True)`` and makes exactly one commit (``HfApi.create_commit``): every
file its ``COMPLETE`` manifest lists (and ``COMPLETE``) and nothing else (not a hidden file, not a
file left beside the checkpoint; a listed file that is a symlink leading outside the folder is
refused), the generated ``README.md`` (the user's folder is never modified), and the deletion of
the files a previously pushed checkpoint left that this one does not have (Orbax's data files have
new names on every save; an msgpack-only push replaces an Orbax one). One commit
means a revision of the repo never holds half of a checkpoint, or the manifest of one with the
files of another. Files in the repo that a checkpoint never writes are left alone.
``dry_run=True`` lists what would be uploaded, with sizes, and calls no API. The result's
``"not_uploaded"`` names the files of the folder that its manifest does not list.

A problem with the local folder (missing, not a folder, unreadable, not a complete checkpoint,
a file failing its sha256) is a :class:`PushInputError` (the command line's exit 3); a Hub failure,
no token or offline mode a :class:`PushError` (exit 5).

``check_push_target`` refuses, before any work, what a push would only fail on at the end: a
malformed repo id (:class:`PushUsageError`), and for a real push through huggingface_hub's own
``HfApi``, offline mode or no token (:class:`PushError`). ``push_checkpoint`` and
``convert(..., push_to_hub=...)`` call it first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from .hub import CHECKPOINT_FOLDER, local_path, not_a_folder
from .layout import (CONFIG_NAME, DIFFUSERS_WEIGHTS, FORMAT_PREFIX, MANIFEST_NAME, PROVENANCE_NAME, WEIGHTS_NAME,
                     read_json, weights_in)

__all__ = ["PushError", "PushUsageError", "PushInputError", "check_push_target", "push_checkpoint",
           "model_card_text", "LICENSES", "TAGS", "plan_upload"]

TAGS = ["jax", "flax", "nnx", "cogvideox", "vae", "video"]
LIBRARY_NAME = "cogvae"

_COGVIDEOX_LICENSE = ("other", "cogvideox-license", "https://huggingface.co/THUDM/CogVideoX-5b/blob/main/LICENSE")
#: Licence of the published CogVideoX VAEs, by source repo name (the org was renamed THUDM -> zai-org):
#: (license, license_name, license_link); repos not listed get no licence field.
LICENSES: dict[str, tuple[str, Optional[str], Optional[str]]] = {
    "cogvideox-2b": ("apache-2.0", None, None),
    "cogvideox-5b": _COGVIDEOX_LICENSE,
    "cogvideox-5b-i2v": _COGVIDEOX_LICENSE,
    "cogvideox1.5-5b": _COGVIDEOX_LICENSE,
    "cogvideox1.5-5b-i2v": _COGVIDEOX_LICENSE,
}
_LICENSE_ORGS = ("thudm", "zai-org")

_REQUIRED = ("config.json", "provenance.json")  # read to build the model card
_GENERATED = ("README.md", DIFFUSERS_WEIGHTS)  # what a push writes itself: never taken from the folder


class PushError(RuntimeError):
    """A checkpoint that cannot be pushed, or a Hub failure; one clear message."""


class PushUsageError(PushError):
    """A push asked for with a bad argument (a malformed repo id): the caller's mistake, found
    before any work (the command line's usage error, exit 2)."""


class PushInputError(PushError):
    """A local folder that cannot be pushed (missing, not a folder, unreadable, not a complete
    converted checkpoint, a file failing its manifest): bad input, not a Hub failure (exit 3)."""


# What git (and so the Hub) refuses in a branch name (git check-ref-format --branch), each rule with
# how the message names it: from the character or sequence found, or the rule as a whole.
_BRANCH_RULES = [
    (re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//"), lambda m: f"{m.group(0)!r} in one"),
    (re.compile(r"^-"), lambda m: "one starting with '-'"),
    (re.compile(r"^/|/$"), lambda m: "one starting or ending with '/'"),
    (re.compile(r"\.$"), lambda m: "one ending with '.'"),
    (re.compile(r"\.lock(/|$)"), lambda m: "a part of one ending with '.lock'"),
    (re.compile(r"(^|/)\."), lambda m: "a part of one starting with '.'"),
]


def branch_problem(revision: Any) -> Optional[str]:
    """Why ``revision`` is not a branch to push to, or None: empty or blank (a CI's unset
    ``$BRANCH`` would otherwise push to main), or a name git refuses (which would be created, or
    fail, only at the end of the push)."""
    if not isinstance(revision, str) or not revision.strip():
        return f"{revision!r} is not a branch name (leave it out to push to main)"
    for rule, named in _BRANCH_RULES:
        bad = rule.search(revision)
        if bad:
            return f"{revision!r} is not a valid branch name (git refuses {named(bad)})"
    if re.fullmatch(r"[0-9a-f]{40}", revision):  # git takes it, but every Hub client reads it as a commit
        return (f"{revision!r} is not a usable branch name (40 hex digits: the Hub and huggingface_hub read "
                "it as a commit sha, so the card's commands could not reach the branch)")
    return None


def check_branch(revision: Any, option: str = "revision") -> None:
    """:class:`PushUsageError` naming ``option`` when ``revision`` (None: main) is no branch name."""
    why = None if revision is None else branch_problem(revision)
    if why:
        raise PushUsageError(f"{option}: {why}")


def check_push_target(repo_id: Any, *, dry_run: bool = False, token: Optional[str] = None, api: Any = None,
                      revision: Optional[str] = None, revision_option: str = "revision") -> None:
    """Refuse, before any work, a push that cannot succeed: a malformed ``repo_id`` or branch
    ``revision`` (:class:`PushUsageError`; ``revision_option`` names it in the message); for a
    real push through huggingface_hub's ``HfApi`` (``api`` is None, not ``dry_run``), no token
    (neither ``token`` nor ``huggingface_hub.get_token()``) or offline mode (``HF_HUB_OFFLINE=1``)
    (:class:`PushError`). A dry run calls no API, so it needs neither; an injected ``api`` is the
    caller's, which decides itself."""
    from .hub import looks_like_repo_id

    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise PushUsageError(f"{repo_id!r}: not a Hub repo id (expected 'org/name')")
    check_branch(revision, revision_option)
    if dry_run or api is not None:
        return
    import huggingface_hub
    from huggingface_hub import constants

    if token is None and huggingface_hub.get_token() is None:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    if constants.is_offline_mode():
        raise PushError(f"{repo_id}: cannot push in offline mode (HF_HUB_OFFLINE=1 is set)")


# ----------------------------------------------------------------------------------------
# checkpoint folder
# ----------------------------------------------------------------------------------------


def _check_checkpoint(ckpt: Path, *, hashes: bool = False) -> list[str]:
    """The paths its ``COMPLETE`` manifest lists, and ``COMPLETE``, when ``ckpt`` is a complete
    converted checkpoint; else one PushInputError naming what is wrong. ``hashes``: every file must
    also have the sha256 its manifest records (what a push checks before uploading). A listed file
    that is a symlink leading outside the folder is refused: a push uploads the checkpoint only."""
    try:
        return _checked_listing(ckpt, hashes)
    except OSError as e:  # an unreadable folder or file (a permission, an I/O error)
        raise _unreadable(ckpt, e) from None


def _unreadable(ckpt: Path, e: OSError) -> PushInputError:
    """``e``, met reading ``ckpt`` or a file of it, as one line naming the file (exit 3)."""
    return PushInputError(f"{e.filename or ckpt}: cannot read: {e.strerror or e}; not pushed")


def _checked_listing(ckpt: Path, hashes: bool) -> list[str]:
    if not ckpt.exists():
        raise PushInputError(f"{ckpt}: no such folder")
    if not ckpt.is_dir():
        raise PushInputError(not_a_folder(ckpt, CHECKPOINT_FOLDER))
    if not os.access(ckpt, os.R_OK | os.X_OK):
        raise PushInputError(f"{ckpt}: cannot read the folder (permission denied); not pushed")
    from .checkpoint import MANIFEST_NAME, CheckpointError, _read_manifest, check_files, is_converted_checkpoint

    if is_converted_checkpoint(ckpt):
        missing = [n for n in _REQUIRED if not (ckpt / n).is_file()]
        if not missing:
            try:
                listed = sorted({*_read_manifest(ckpt)["files"], MANIFEST_NAME})  # and the manifest itself
            except CheckpointError as e:
                raise PushInputError(f"{e}; not pushed") from None
            _refuse_unpushable(ckpt, listed)
            # Orbax reads whatever its folder holds, so load refuses a file there that the manifest
            # does not list; uploading the listed files alone would publish an unreadable repo.
            extra = sorted(rel for rel in (p.relative_to(ckpt).as_posix() for p in (ckpt / FORMAT_PREFIX["orbax"])
                                           .rglob("*") if p.is_file() or p.is_symlink()) if rel not in listed)
            if extra:
                raise PushInputError(f"{ckpt}: {len(extra)} file(s) in orbax/ that its {MANIFEST_NAME} manifest does "
                                     f"not list (first: {extra[0]}): load refuses such a checkpoint; not pushed")
            if hashes:
                try:
                    check_files(ckpt)
                except CheckpointError as e:  # every reader of the repo would refuse such a file
                    raise PushInputError(f"{e}; not pushed (load, verify and export-diffusers would refuse it)") \
                        from None
            return listed
    else:
        missing = [n for n in (*_REQUIRED, MANIFEST_NAME) if not (ckpt / n).is_file()]
        try:  # the manifest names every file of the checkpoint
            listed = read_json(ckpt / MANIFEST_NAME).get("files", {})
            missing += [rel for rel in listed if rel not in missing and not (ckpt / rel).is_file()]
        except (OSError, ValueError, AttributeError):
            pass
        if not missing:  # every file there: name what differs (a size, the manifest itself)
            try:
                check_files(ckpt, hashes=False)
            except CheckpointError as e:
                raise PushInputError(f"{e}; not pushed (run `cogvae convert` again)") from None
    if MANIFEST_NAME in missing and any((d / CONFIG_NAME).is_file() and weights_in(d) for d in (ckpt, ckpt / "vae")):
        raise PushInputError(f"{ckpt}: a diffusers VAE folder, not a converted checkpoint; convert it first "
                             f"(`cogvae convert {ckpt} --out CKPT`), then push CKPT")
    detail = (f"missing: {', '.join(missing)}" if missing
              else f"files differ from its {MANIFEST_NAME} manifest")
    raise PushInputError(f"{ckpt}: not a complete converted checkpoint ({detail}); run `cogvae convert` again")


def _refuse_unpushable(ckpt: Path, listed: list[str]) -> None:
    """A listed file a push must not upload: one that leads outside the folder through a symlink
    (its content is not the checkpoint's to publish, whatever the manifest says), one named like
    a file the push itself writes (the model card, the diffusers weights), which would replace it,
    or any other file a checkpoint does not write (another tool's manifest may list anything)."""
    root = ckpt.resolve()
    for rel in listed:
        if rel in _GENERATED:
            raise PushInputError(f"{ckpt / rel}: listed in the {MANIFEST_NAME} manifest, but push writes {rel} "
                                 "itself; not pushed (convert the checkpoint again)")
        if not _checkpoint_writes(rel):
            # (a .gitattributes would replace the repo's LFS rules, a diffusers index would be what
            # from_pretrained loads; a checkpoint writes neither)
            raise PushInputError(f"{ckpt / rel}: listed in the {MANIFEST_NAME} manifest, but not a file of a "
                                 f"cogvae checkpoint ({CONFIG_NAME}, {PROVENANCE_NAME}, {FORMAT_PREFIX['msgpack']}, "
                                 f"{FORMAT_PREFIX['orbax']}...); not pushed (convert the checkpoint again)")
        target = (ckpt / rel).resolve()
        if target != root and root not in target.parents:
            raise PushInputError(f"{ckpt / rel}: a symlink leading outside the checkpoint folder (to {target}); "
                                 "not pushed (copy the file into the folder instead)")


def _read_json(path: Path) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise PushInputError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise PushInputError(f"{path}: expected a JSON object")
    return data


#: What ``save`` records as the source of a model that has no base (not a model id or path).
_NO_SOURCE = "<in-memory model>"


def _origin_record(src: Any, provenance: dict) -> dict:
    """{"id", "revision", "is_hub", "kind", "subfolder", "variant"} of one source entry of
    provenance.json: a string (the flat layout, its revision and is_hub beside it in
    ``provenance``) or a dict; ``subfolder`` and ``variant``: the pipeline subfolder and weights
    variant a conversion read (None where not recorded)."""
    rev = provenance.get("revision")
    is_hub = provenance.get("is_hub")
    kind = sub = variant = None
    if isinstance(src, dict):
        rev = src.get("revision", rev)
        is_hub = src.get("is_hub", is_hub)
        kind = src.get("kind") if src.get("kind") in ("diffusers", "checkpoint") else None
        sub = src.get("subfolder") if isinstance(src.get("subfolder"), str) else None
        variant = src.get("variant") if isinstance(src.get("variant"), str) and src.get("variant") else None
        src = src.get("source_id") or src.get("repo_id") or src.get("id") or src.get("path")
    src = src or provenance.get("source_id") or provenance.get("repo_id")
    if src is not None and not isinstance(src, str):
        src = str(src)
    if src == _NO_SOURCE:
        src = None
    if not src:
        return {"id": None, "revision": None, "is_hub": False, "kind": None, "subfolder": None, "variant": None}
    if is_hub is None:
        from .hub import looks_like_repo_id

        is_hub = looks_like_repo_id(src) and not Path(src).exists()
    return {"id": src, "revision": rev if isinstance(rev, str) else None, "is_hub": bool(is_hub), "kind": kind,
            "subfolder": sub, "variant": variant}


def provenance_origin(provenance: dict) -> dict:
    """Where a checkpoint's weights came from, read from its provenance.json: the one parser of
    the layouts cogvae writes or accepts (``push``'s model card, ``save(..., base=)``).

    Layouts: flat (``{"source": "org/name", "revision": ..., "is_hub": ...}``), nested (``"source":
    {"id" | "source_id" | "repo_id" | "path", "revision", "is_hub"}``, what ``cogvae-convert``
    writes), and ``save``'s (the nested one plus ``"saved_from"`` and ``"origin"``).
    Returns ``{"id", "revision", "is_hub", "kind", "subfolder", "variant", "saved", "root"}``: ``id``
    is what the model card names as its base (a conversion's source; for a save, the nearest Hub repo among its
    ancestors, else its local base; None when unknown), ``kind`` 'diffusers', 'checkpoint' or None,
    ``saved`` whether ``save`` wrote it, ``root`` the ``{"id", "revision", "is_hub"}`` the weights
    first came from (the converted diffusers model, whose licence they keep); ``subfolder`` and
    ``variant`` what the conversion read of ``id`` (carried over by ``save`` from a local base).
    """
    src: Any = provenance.get("source")
    out = _origin_record(src, provenance)
    saved = isinstance(src, dict) and bool(src.get("saved_from"))
    if out["kind"] is None and out["id"] and not saved:
        out["kind"] = "diffusers"  # cogvae-convert converts diffusers files only
    root = _origin_record(src.get("origin"), {}) if isinstance(src, dict) and isinstance(src.get("origin"), dict) \
        else None
    if root is None or not root["id"]:
        root = out
    out["root"] = {k: root[k] for k in ("id", "revision", "is_hub")}
    out["saved"] = saved
    return out


def _source_of(provenance: dict) -> tuple[Optional[str], Optional[str], bool]:
    """(source id, revision, is_hub) from provenance.json (see :func:`provenance_origin`)."""
    o = provenance_origin(provenance)
    return o["id"], o["revision"], o["is_hub"]


def _license_for(source_id: Optional[str]) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """The licence of a published CogVideoX VAE repo (``LICENSES``), None for any other id."""
    if not source_id or not isinstance(source_id, str) or "/" not in source_id:
        return None
    org, name = source_id.lower().split("/", 1)
    return LICENSES.get(name) if org in _LICENSE_ORGS else None


def _licence_of(origin: dict) -> Optional[tuple[str, tuple[str, Optional[str], Optional[str]]]]:
    """(the Hub repo whose licence the weights keep, that licence): the root source's (a fine-tune
    of a fine-tune keeps the licence of the model first converted), else the card's base model's."""
    for o in (origin["root"], origin):
        lic = _license_for(o["id"]) if o["is_hub"] else None
        if lic:
            return o["id"], lic
    return None


def _describe(o: dict, *, kind: Optional[str] = None) -> str:
    """A source for the card: a link to its Hub repo (and commit), or the local folder's kind and path."""
    if o["is_hub"]:
        return f"[`{o['id']}`](https://huggingface.co/{o['id']})" + (f" at commit `{o['revision']}`"
                                                                     if o["revision"] else "")
    what = {"diffusers": "a local diffusers folder", "checkpoint": "a local cogvae checkpoint"}
    return f"{what.get(kind, 'a local folder')} (`{o['id']}`)"


def _origin_text(origin: dict) -> str:
    """Where the weights come from, as the card's first sentence ends ("... from <this>")."""
    if not origin["saved"]:
        return _describe(origin, kind=origin["kind"]) if origin["id"] else "a diffusers checkpoint"
    text = "a model saved from JAX (`cogvae.converter.save`)"
    if origin["id"]:
        text += f", based on {_describe(origin, kind=origin['kind'])}"
        root = origin["root"]
        if root["id"] and root["is_hub"] and root["id"] != origin["id"]:
            text += f" (whose weights were first converted from {_describe(root)})"
    return text


def _commit_message(provenance: dict) -> str:
    o = provenance_origin(provenance)
    if o["saved"]:
        return "Upload CogVideoX VAE saved from JAX by cogvae" + (f", based on {o['id']}" if o["id"] else "")
    return "Upload CogVideoX VAE converted by cogvae" + (f" from {o['id']}" if o["id"] else "")


# ----------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------


def model_card_text(repo_id: str, config: dict, provenance: dict, *, diffusers: bool = False,
                    revision: Optional[str] = None, formats: Optional[list[str]] = None) -> str:
    """The README.md (YAML metadata + markdown) for a converted checkpoint pushed to ``repo_id``;
    ``diffusers``: the push also holds the weights in diffusers' format; ``revision``: the branch
    it is pushed to (or a pull request's base), which the card's code and commands then name (they
    would otherwise read the repo's main branch: other weights); ``formats``: the ones uploaded
    (default: what provenance.json records)."""
    from huggingface_hub import ModelCard, ModelCardData

    origin = provenance_origin(provenance)
    source_id, is_hub = origin["id"], origin["is_hub"]
    licensed = _licence_of(origin)
    lic = licensed[1] if licensed else None
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=list(TAGS) + (["diffusers"] if diffusers else []),
        base_model=source_id if is_hub else None,
        license=lic[0] if lic else None,
        license_name=lic[1] if lic else None,
        license_link=lic[2] if lic else None,
    )
    origin_text = _origin_text(origin)
    if formats is None:
        formats = provenance.get("formats") or ["orbax", "msgpack"]
    formats = [f for f in formats if f in ("orbax", "msgpack")]
    described = {"orbax": "`orbax/` (Orbax checkpoint)", "msgpack": "`params.msgpack` (Flax msgpack)"}
    files = "".join(described[f] + ", " for f in formats)
    first = "Orbax" if "orbax" in formats else "msgpack"
    channels = int(config.get("latent_channels") or 16)
    ref = ""
    if is_hub and source_id:
        # The base exactly as the weights came from it: its commit (a later push to its main
        # branch, or a base on another branch, would otherwise be compared) and, for a conversion,
        # the pipeline subfolder the VAE was read from.
        ref = f" --reference {source_id}"
        if origin["revision"]:
            ref += f" --reference-revision {origin['revision']}"
        # (a fine-tune saved from a local conversion of the base carries them over; see save)
        sub = origin["subfolder"]
        if sub is not None and sub.strip("/") not in ("", "vae"):
            ref += f" --reference-subfolder {sub.strip('/')}"
        # converted with --variant: the base's weights of that variant (without it, a repo
        # holding only variant weights has none to compare, one with both the fp32 ones)
        if origin["variant"]:
            ref += f" --reference-variant {shlex.quote(origin['variant'])}"
    branch = revision if revision and revision != "main" else None
    rev_arg = f", revision={json.dumps(branch)}" if branch else ""
    rev_opt = f" --revision {shlex.quote(branch)}" if branch else ""
    load_line = f"vae = load(REPO_ID{rev_arg})"
    arch = ", ".join(f"{k}={config[k]}" for k in ("block_out_channels", "latent_channels", "layers_per_block",
                                                  "scaling_factor") if k in config)
    dfile = dusage = ""
    if diffusers:
        dfile = (f"\n- `{DIFFUSERS_WEIGHTS}`: the same weights in diffusers' format (exported by cogvae through the "
                 "inverse mapping, bit for bit)")
        dusage = f"""
The repo is also a diffusers VAE (the same `config.json` and weights):

```python
from diffusers import AutoencoderKLCogVideoX

vae = AutoencoderKLCogVideoX.from_pretrained("{repo_id}"{rev_arg})
```
"""
    lic_line = ""
    if lic:
        lic_line = (f"\n## Licence\n\nThe weights keep the licence of the source model, "
                    f"[`{licensed[0]}`](https://huggingface.co/{licensed[0]}): `{lic[0]}`"
                    + (f" ({lic[1]}, see {lic[2]})" if lic[1] else "") + ".\n")
    body = f"""
# {repo_id.split('/')[-1]}

The CogVideoX video VAE (diffusers `AutoencoderKLCogVideoX`) converted to JAX / Flax NNX by
[cogvae](https://pypi.org/project/cogvae/), from {origin_text}.

- Architecture: {arch or 'see config.json'}
- Layout: `(B, T, H, W, C)` (diffusers uses `(B, C, T, H, W)`)
- Files: {files}`config.json` (the diffusers config), `provenance.json` (source, revision, mapping
  and checksums), `COMPLETE` (every file's size and sha256, checked on loading){dfile}

## Usage

```python
import jax
from cogvae.converter import load

REPO_ID = "{repo_id}"
{load_line:<44} # fetches one format ({first}), checks it against COMPLETE

# scaled latents (B, t, h, w, {channels}), as a CogVideoX pipeline makes them
z = jax.random.normal(jax.random.key(0), (1, 2, 8, 8, {channels}))
video = vae.decode(vae.unscale_latents(z))   # (B, T, H, W, 3), values in [-1, 1]
mean, logvar = vae.encode(video)             # each (B, t, h, w, {channels})
z = vae.scale_latents(mean)                  # back to the pipeline's scaled latents
```

```bash
cogvae verify {repo_id}{rev_opt}{ref}   # hashes, architecture, finiteness, parity
cogvae export-diffusers {repo_id}{rev_opt} --out vae-diffusers/        # back to diffusers files
```
{dusage}{lic_line}"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


# ----------------------------------------------------------------------------------------
# staging and upload
# ----------------------------------------------------------------------------------------


def _unlisted(ckpt: Path, listed: list[str]) -> list[str]:
    """The files (and symlinks) under ``ckpt`` that its manifest does not list: never uploaded.
    Symlinked folders are not followed (each is one entry); unreadable folders are skipped."""
    keep = set(listed)
    out = []
    for top, dirs, files in os.walk(ckpt, onerror=lambda e: None):
        here = Path(top)
        entries = files + [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
        out += [rel for rel in ((here / n).relative_to(ckpt).as_posix() for n in entries) if rel not in keep]
    return sorted(out)


def _plan(ckpt: Path, repo_id: str, listed: list[str], diffusers: Optional[Path], revision: Optional[str] = None
          ) -> tuple[list[dict], str]:
    try:
        files = [{"path": rel, "size": (ckpt / rel).stat().st_size} for rel in listed]
    except OSError as e:
        raise _unreadable(ckpt, e) from None
    # the formats the upload holds, as its manifest lists them (provenance.json is informational)
    formats = [f for f, prefix in FORMAT_PREFIX.items()
               if any(rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)) for rel in listed)]
    card = model_card_text(repo_id, _read_json(ckpt / CONFIG_NAME), _read_json(ckpt / PROVENANCE_NAME),
                           diffusers=diffusers is not None, revision=revision, formats=formats)
    files.append({"path": "README.md", "size": len(card.encode("utf-8"))})
    if diffusers is not None:
        files.append({"path": DIFFUSERS_WEIGHTS, "size": Path(diffusers).stat().st_size})
    return sorted(files, key=lambda f: f["path"]), card


def plan_upload(ckpt_dir: str | os.PathLike, repo_id: str, *, diffusers: Optional[Path] = None,
                revision: Optional[str] = None) -> tuple[list[dict], str]:
    """([{path, size}] of every file to upload, README.md included; the model card text): the files
    the checkpoint's manifest lists, the card, and (``diffusers``: an exported diffusers weights
    file) ``DIFFUSERS_WEIGHTS``. Files of the folder the manifest does not list are not uploaded.
    ``revision``: the branch pushed to, which the card names."""
    ckpt = local_path(ckpt_dir)  # ~ expanded, as every path cogvae takes
    return _plan(ckpt, repo_id, _check_checkpoint(ckpt), diffusers, revision)


def _export_weights(ckpt: Path, into: Path) -> Path:
    """The checkpoint's weights in diffusers' format (``export_diffusers``: every check, bit for bit),
    and its config.json must be the checkpoint's, which the repo shares."""
    from .saving import export_diffusers

    export_diffusers(ckpt, into / "export")
    # the same settings (and version); the export sorts its keys as diffusers does, the checkpoint's need not
    if read_json(into / "export" / "config.json") != read_json(ckpt / "config.json"):
        raise PushInputError(f"{ckpt}: its config.json differs from the diffusers config of its architecture; "
                        "convert it again to push diffusers weights with it")
    return into / "export" / DIFFUSERS_WEIGHTS


def _checkpoint_writes(rel: str) -> bool:
    """A path a converted checkpoint folder holds: its config, provenance, manifest and parameters."""
    return rel in (CONFIG_NAME, PROVENANCE_NAME, MANIFEST_NAME, FORMAT_PREFIX["msgpack"]) \
        or rel.startswith(FORMAT_PREFIX["orbax"])


def _is_checkpoint_file(rel: str) -> bool:
    """A path that a pushed checkpoint writes (and a later push may therefore replace or delete).
    Diffusers weights at the root count: they pair with the ``config.json`` a push replaces, so
    left behind they would be another model's weights under this one's config."""
    if "/" not in rel and rel.startswith(WEIGHTS_NAME):  # any diffusers weights file at the root:
        # .safetensors or .bin, a variant, a shard or an index (diffusers falls back to a .bin)
        return rel.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
    return _checkpoint_writes(rel) or rel == "README.md"  # exact names otherwise: params.msgpack.old is not ours


def _operations(ckpt: Path, listed: list[str], card: str, remote: list[str], diffusers: Optional[Path] = None
                ) -> tuple[list, list[str]]:
    """The commit: an add for every file of ``ckpt`` its manifest lists (``listed``), the card (and
    the diffusers weights), a delete for every checkpoint file in ``remote`` (the repo's files now)
    not among them."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    adds = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(ckpt / rel)) for rel in listed]
    adds.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    if diffusers is not None:
        adds.append(CommitOperationAdd(path_in_repo=DIFFUSERS_WEIGHTS, path_or_fileobj=str(diffusers)))
    added = {op.path_in_repo for op in adds}
    stale = sorted(rel for rel in remote if _is_checkpoint_file(rel) and rel not in added)
    return [CommitOperationDelete(path_in_repo=rel) for rel in stale] + adds, stale


def _push_error(e: BaseException, repo_id: str, step: str, *, revision: Optional[str] = None,
                create_pr: bool = False) -> PushError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, OfflineModeIsEnabled):
        return PushError(f"{repo_id}: cannot push in offline mode (HF_HUB_OFFLINE=1 is set)")
    if isinstance(e, RevisionNotFoundError):
        if create_pr:  # the branch is the pull request's base: it must exist already
            return PushError(f"{repo_id}: {step} failed: revision {revision!r} not found: a pull request needs an "
                             "existing base branch (create it first, or leave out --revision to open the pull "
                             "request against main)")
        return PushError(f"{repo_id}: {step} failed: revision not found (create the branch first, or pass --create-pr)")
    if isinstance(e, (RepositoryNotFoundError, GatedRepoError)):
        return PushError(f"{repo_id}: {step} failed: repository not found or not writable with this token")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 412:  # create_commit's parent_commit is no longer the branch's head
            return PushError(f"{repo_id}: {step} failed: {revision or 'main'} moved while pushing (another commit "
                             "landed after its files were listed); nothing was committed: push again")
        if status in (401, 403):
            return PushError(f"{repo_id}: {step} failed: not authorised (HTTP {status}): check the token's write "
                             "access (`hf auth login` or HF_TOKEN)")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return PushError(f"{repo_id}: {step} failed: {first}")
    try:
        from httpx2 import TransportError as _Transport
    except ImportError:  # pragma: no cover
        _Transport = ConnectionError
    if isinstance(e, (ConnectionError, TimeoutError, _Transport)):
        return PushError(f"{repo_id}: {step} failed: cannot reach the Hugging Face Hub ({type(e).__name__}: {e})")
    return PushError(f"{repo_id}: {step} failed: {type(e).__name__}: {e}")


def _commit(api: Any, ckpt: Path, listed: list[str], repo_id: str, card: str, diffusers: Optional[Path], *,
            private: bool,
            revision: Optional[str], create_pr: bool, token: Optional[str]) -> tuple[Any, list[str]]:
    """Create the repo (and branch), then one commit; (the commit info, the deleted paths)."""
    if api is None:
        from huggingface_hub import HfApi, get_token

        if token is None and get_token() is None:
            raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
        api = HfApi(token=token)

    message = _commit_message(_read_json(ckpt / "provenance.json"))

    def call(step: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - Hub failures become one PushError line
            if isinstance(e, AssertionError):
                raise
            raise _push_error(e, repo_id, step, revision=revision, create_pr=create_pr) from e

    call("create_repo", api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model")
    if private:
        # create_repo(exist_ok=True) leaves an existing repo as it is: a public one would publish
        # weights its owner asked to keep private
        public = getattr(call("repo_info", api.repo_info, repo_id, repo_type="model"), "private", None) is False
        if public:
            raise PushError(f"{repo_id}: the repo exists and is public, and --private does not change an existing "
                            "repo's visibility; nothing was pushed (make it private on the Hub first, or leave out "
                            "--private)")
    created = False  # whether this push made the branch (and so removes it again if the push fails)
    if revision and not create_pr:
        try:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=False)
            created = True
        except Exception as e:  # noqa: BLE001 - HTTP 409: the branch is there already, as it may be
            if isinstance(e, AssertionError):
                raise
            if getattr(getattr(e, "response", None), "status_code", None) != 409:
                raise _push_error(e, repo_id, f"create_branch {revision!r}", revision=revision) from e
    try:
        # What the commit builds on: the branch, or a pull request's base (main by default), at one
        # commit: its files are listed there, and the commit names it as its parent, so that a push
        # landing in between fails this one (HTTP 412) instead of leaving this manifest beside the
        # other push's files (the deletions below are computed from this listing).
        head = call("repo_info", api.repo_info, repo_id, revision=revision, repo_type="model").sha
        remote = list(call("list_repo_files", api.list_repo_files, repo_id, revision=head or revision,
                           repo_type="model"))
        operations, stale = _operations(ckpt, listed, card, remote, diffusers)
        info = call("upload", api.create_commit, repo_id=repo_id, operations=operations, commit_message=message,
                    repo_type="model", revision=revision, create_pr=create_pr, parent_commit=head)
    except PushError as e:
        if not created:
            raise
        # A new branch points at main's commit: left behind, it would serve main's checkpoint under
        # the name this push gave its own.
        try:
            api.delete_branch(repo_id, branch=revision, repo_type="model")
            note = f"; the branch {revision!r} this push created was deleted again"
        except Exception:  # noqa: BLE001 - say what is left, with the failure that matters
            note = (f"; the branch {revision!r} this push created is left behind, holding main's files: "
                    "delete it on the Hub")
        raise PushError(f"{e}{note}") from e
    return info, stale


@contextlib.contextmanager
def _hub_progress_bars(shown: bool) -> Iterator[None]:
    """huggingface_hub's progress bars on or off for the block (a process-wide switch: put back)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not shown:
        disable_progress_bars()
    try:
        yield
    finally:
        if not shown and not was_disabled:
            enable_progress_bars()


def push_checkpoint(
    ckpt_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: Optional[str] = None,
    api: Any = None,
    with_diffusers: bool = False,
    quiet: bool = False,
) -> dict:
    """Upload a converted checkpoint folder and a generated model card to the Hub model repo ``repo_id``.

    Uploads the files its ``COMPLETE`` manifest lists, nothing else of the folder; a listed file
    that is a symlink leading outside the folder is refused. Returns ``{"repo_id", "revision",
    "create_pr", "files": [{"path", "size"}], "not_uploaded", "dry_run", "model_card"}``
    (``revision``: the branch, "main" by default; ``not_uploaded``: the folder's files that the
    manifest does not list) plus, after a
    real push, ``"url"`` (the commit or pull-request URL), ``"commit"`` (its sha) and
    ``"deleted"`` (the previous checkpoint's files that the commit removed). ``revision``
    is the branch to commit to (created if missing, unless ``create_pr``, where it is the PR's
    base). ``api``: an ``HfApi``-like object (default ``HfApi(token=token)``); without one, a
    token is required (``token`` or ``huggingface_hub.get_token()``) and offline mode must be off.
    A malformed ``repo_id`` raises :class:`PushUsageError`; these are checked before the folder
    is hashed (:func:`check_push_target`). ``with_diffusers``: also
    upload the weights in diffusers' format (``diffusion_pytorch_model.safetensors``, exported
    bit for bit), so ``AutoencoderKLCogVideoX.from_pretrained(repo_id)`` loads the same model.
    Without it, diffusers weights a previous push left at the repo's root are deleted.
    A problem with the folder raises :class:`PushInputError`; a Hub failure :class:`PushError`.
    ``quiet`` (or a stderr that is not a terminal, such as a CI log) hides huggingface_hub's
    upload progress bars, which would otherwise redraw there with carriage returns.
    """
    check_push_target(repo_id, dry_run=dry_run, token=token, api=api, revision=revision)  # before hashing, exporting
    ckpt = local_path(ckpt_dir)  # ~ expanded, as every path cogvae takes
    listed = _check_checkpoint(ckpt, hashes=True)
    with tempfile.TemporaryDirectory(prefix="cogvae-push-") as tmp:
        diffusers = _export_weights(ckpt, Path(tmp)) if with_diffusers else None
        # a pull request's card lands on its base branch when merged: the same revision
        files, card = _plan(ckpt, repo_id, listed, diffusers, revision)
        # where it goes, as the text output says it: the branch ("main" when none is given), and
        # whether as a pull request against it
        result: dict[str, Any] = {"repo_id": repo_id, "revision": revision or "main", "create_pr": create_pr,
                                  "files": files, "not_uploaded": _unlisted(ckpt, listed), "dry_run": dry_run,
                                  "model_card": card}
        if dry_run:
            return result
        with _hub_progress_bars(not quiet and sys.stderr.isatty()):
            info, result["deleted"] = _commit(api, ckpt, listed, repo_id, card, diffusers, private=private,
                                              revision=revision, create_pr=create_pr, token=token)
    pr_url = getattr(info, "pr_url", None)
    result["url"] = pr_url or getattr(info, "commit_url", None) or (str(info) if info is not None else None)
    result["commit"] = getattr(info, "oid", None)
    if pr_url:
        result["pr_url"] = pr_url
    return result
