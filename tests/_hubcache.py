"""Test helpers: a tiny real diffusers CogVideoX VAE on disk, and a real Hugging Face Hub cache.

Nothing here is faked: the VAE is diffusers' own ``AutoencoderKLCogVideoX`` written by its
``save_pretrained``; the cache follows huggingface_hub's on-disk layout
(``models--<org>--<name>/{blobs,refs,snapshots}``, snapshot files as relative symlinks into
``blobs/``, ``refs/<ref>`` holding the 40-hex commit without a newline), so the real
``snapshot_download`` resolves it offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

TINY_CONFIG = dict(
    block_out_channels=(8, 16),
    down_block_types=("CogVideoXDownBlock3D",) * 2,
    up_block_types=("CogVideoXUpBlock3D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)


def tiny_diffusers_vae(seed: int = 0):
    """diffusers' AutoencoderKLCogVideoX with the tiny config and seeded random weights (fp32, eval)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(**TINY_CONFIG).eval()


def save_tiny_vae(folder: Path, *, seed: int = 0, fp16_variant: bool = False) -> Path:
    """Write the tiny VAE in diffusers format into ``folder`` (fp32; plus an fp16 variant if asked)."""
    model = tiny_diffusers_vae(seed)
    model.save_pretrained(folder, safe_serialization=True)
    if fp16_variant:
        model.half().save_pretrained(folder, safe_serialization=True, variant="fp16")
    return Path(folder)


def _blob_name(data: bytes, lfs: bool) -> str:
    # The Hub's etag: sha256 of the content for LFS files, the git blob sha1 for regular files.
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path], *, commit: str,
                 refs: tuple[str, ...] = ("main",), tree_only: dict[str, int] | None = None) -> Path:
    """Add one commit of ``repo_id`` to a Hub cache: ``files`` maps repo paths to local files.

    Returns the snapshot folder. ``refs`` (branch/tag names) are pointed at ``commit``. With
    ``tree_only`` (repo path -> size), also write the cached tree listing
    (``trees/<commit>.json``, as ``snapshot_download`` records it) naming every file of the
    commit, including these files that are on the Hub but not downloaded into the snapshot.
    """
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    for rel, src in files.items():
        data = Path(src).read_bytes()
        blob = blobs / _blob_name(data, lfs=rel.endswith(".safetensors"))
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    if tree_only is not None:
        listing = {}
        for rel, src in files.items():
            data = Path(src).read_bytes()
            entry = {"size": len(data), "blob_id": _blob_name(data, lfs=False)}
            if rel.endswith(".safetensors"):
                entry.update(lfs_sha256=_blob_name(data, lfs=True), lfs_size=len(data))
            listing[rel] = entry
        for rel, size in tree_only.items():
            listing[rel] = {"size": size, "blob_id": "0" * 40, "lfs_sha256": "0" * 64, "lfs_size": size}
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snap


def pipeline_files(vae_folder: Path, subfolder: str = "vae") -> dict[str, Path]:
    """Repo paths -> local files for a pipeline repo whose VAE lies in ``subfolder/``
    (plus a ``model_index.json``)."""
    vae_folder = Path(vae_folder)
    out = {f"{subfolder}/{p.name}" if subfolder else p.name: p for p in sorted(vae_folder.iterdir()) if p.is_file()}
    index = vae_folder.parent / f"{vae_folder.name}_model_index.json"
    index.write_text(json.dumps({"_class_name": "CogVideoXPipeline", "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    out["model_index.json"] = index
    return out


def diffusers_params(vae_folder: Path):
    """(VAEConfig, {dotted NNX path: np.ndarray}) of a diffusers VAE folder, through the strict engine."""
    from flax import nnx

    from cogvae.converter.engine import convert_flat, path_to_str
    from cogvae.converter.loading import find_diffusers_vae
    from cogvae.converter.mapping import load_mapping
    from cogvae.converter.st_io import open_safetensors
    from cogvae.model import VAEConfig, abstract_model

    src = find_diffusers_vae(vae_folder)
    config = VAEConfig.from_json_file(src.config_path)
    _, abstract_state = nnx.split(abstract_model(config))
    flat = convert_flat(open_safetensors(src.weights_path), abstract_state, load_mapping(),
                        source_name=str(src.weights_path))
    return config, {path_to_str(k): v for k, v in flat.items()}


def write_unchecked(out: Path, params: dict, config, *, formats=("orbax", "msgpack"), provenance: dict | None = None
                    ) -> Path:
    """A checkpoint folder with a valid manifest whatever ``params`` hold: what another tool (or an
    older cogvae) could leave. ``write_checkpoint`` refuses parameters that do not fit the config,
    so this uses the writer's parts directly; readers must catch what it lets through."""
    from cogvae.converter.checkpoint import atomic_output_dir, finish_into, write_into

    with atomic_output_dir(out) as tmp:
        known = write_into(tmp, params, config, formats=formats)
        finish_into(tmp, formats, dict(provenance or {}), known)
    return out


def make_checkpoint(out: Path, vae_folder: Path, *, provenance: dict | None = None, formats=("orbax", "msgpack"),
                    params_hook=None) -> Path:
    """A real converted checkpoint (cogvae.converter.checkpoint.write_checkpoint) of a diffusers VAE
    folder; ``params_hook(params)`` may alter the parameters first, to build corrupt checkpoints
    (written by :func:`write_unchecked`, as write_checkpoint refuses them)."""
    from cogvae.converter.checkpoint import write_checkpoint

    config, params = diffusers_params(vae_folder)
    params = {k: np.array(v) for k, v in params.items()}
    provenance = provenance or {"source": str(vae_folder)}
    if params_hook is not None:
        params_hook(params)
        return write_unchecked(out, params, config, formats=formats, provenance=provenance)
    return write_checkpoint(out, params, config, formats=formats, provenance=provenance)


def record_requests(monkeypatch, *, refuse: bool = False) -> list:
    """Wrap huggingface_hub.snapshot_download to record each request's (revision, allow_patterns);
    the real one still runs. ``refuse``: fail at once on any request instead (a test that must not
    ask the Hub; AssertionError passes through resolve_source unchanged)."""
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download

    def recording(**kw):
        asked.append((kw["revision"], kw["allow_patterns"]))
        if refuse:
            raise AssertionError(f"asked the Hub: {kw['revision']} {kw['allow_patterns']}")
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    return asked
