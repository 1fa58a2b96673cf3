"""The file names of the two folder layouts cogvae reads and writes, in one place.

A converted cogvae checkpoint (see ``cogvae.converter.checkpoint``) and a diffusers VAE folder
(``config.json`` plus ``diffusion_pytorch_model[.<variant>].safetensors``, or a sharded index).
This module imports nothing heavy, so resolving a Hub source does not import jax.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

# a converted checkpoint
MANIFEST_NAME = "COMPLETE"
ORBAX_DIR = "orbax"
MSGPACK_NAME = "params.msgpack"
CONFIG_NAME = "config.json"
PROVENANCE_NAME = "provenance.json"
# Where each format's parameters lie: the manifest's paths of that format start with this (the
# Orbax folder's files, or the one msgpack file).
FORMAT_PREFIX = {"orbax": ORBAX_DIR + "/", "msgpack": MSGPACK_NAME}

# a diffusers VAE folder
WEIGHTS_NAME = "diffusion_pytorch_model"
DIFFUSERS_WEIGHTS = WEIGHTS_NAME + ".safetensors"
#: what a weights variant written by cogvae may be called (it becomes part of a file name: fp16, bf16, ema)
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
VARIANT_RULE = "letters, digits, '_' and '-', starting with a letter or digit (for example fp16)"


def single_weights_name(variant: Optional[str] = None) -> str:
    """The one-file weights of ``variant``: ``diffusion_pytorch_model[.<variant>].safetensors``."""
    return WEIGHTS_NAME + (f".{variant}" if variant else "") + ".safetensors"


def weights_names(variant: Optional[str] = None) -> list[str]:
    """The names of a VAE's weights of ``variant``, in the order they are looked for: diffusers'
    ``from_pretrained`` order first, a sharded index before the single file (``_fetch_index_file``:
    ``diffusion_pytorch_model.safetensors.index[.<variant>].json``; for a variant, then
    ``_fetch_index_file_legacy``'s ``diffusion_pytorch_model.safetensors.<variant>.index.json``),
    so a folder holding both is read as diffusers reads it. Last, for a variant, the index spelling
    ``diffusion_pytorch_model.<variant>.safetensors.index.json``, which diffusers does not read:
    only when nothing diffusers reads is there."""
    v = f".{variant}" if variant else ""
    names = [f"{WEIGHTS_NAME}.safetensors.index{v}.json"]
    if variant:
        names.append(f"{WEIGHTS_NAME}.safetensors{v}.index.json")
    names.append(single_weights_name(variant))
    if variant:
        names.append(f"{WEIGHTS_NAME}{v}.safetensors.index.json")
    return names


# (a variant with a dot, such as v1.5, is one diffusers writes: diffusion_pytorch_model.v1.5.safetensors)
_WEIGHTS_FILE = re.compile(
    re.escape(WEIGHTS_NAME) + r"(?:\.(?P<a>[A-Za-z0-9][A-Za-z0-9_.-]*?))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)"
    r"(?:(?:\.(?P<c>[A-Za-z0-9][A-Za-z0-9_-]*?))?\.index(?:\.(?P<b>[A-Za-z0-9][A-Za-z0-9_-]*))?\.json)?")


def weights_variant(name: str) -> tuple[bool, Optional[str]]:
    """``(True, variant)`` for a diffusers weights file name (single, shard or index, safetensors or
    .bin; variant None for the plain weights), ``(False, None)`` for any other name.
    ``diffusion_pytorch_model.fp16-00001-of-00002.safetensors`` and
    ``diffusion_pytorch_model.safetensors.index.fp16.json`` are both fp16's."""
    m = _WEIGHTS_FILE.fullmatch(name)
    if m is None:
        return False, None
    return True, m.group("a") or m.group("b") or m.group("c")


def weights_in(folder: Path, variant: Optional[str] = None) -> Optional[Path]:
    """The weights file (single or index) of ``variant`` in ``folder``, or None."""
    for name in weights_names(variant):
        if (folder / name).is_file():
            return folder / name
    return None


def variants_in(folder: Path) -> list[Optional[str]]:
    """The weights variants ``folder`` holds safetensors weights of (None: the plain weights), as
    :func:`weights_in` finds them; for the error that names what a folder has instead."""
    found: set[Optional[str]] = set()
    pattern = re.compile(rf"{re.escape(WEIGHTS_NAME)}\.(?:safetensors\.(?:index\.)?)?(.+?)"
                         rf"(?:-\d+-of-\d+)?\.(?:safetensors|json|index\.json|safetensors\.index\.json)")
    for p in folder.glob(f"{WEIGHTS_NAME}*"):
        m = pattern.fullmatch(p.name)
        if m and m.group(1) not in ("safetensors", "index"):
            found.add(m.group(1))
    return [v for v in [None, *sorted(found)] if weights_in(folder, v) is not None]


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``, decoded as UTF-8 (what diffusers and huggingface_hub write, whatever the
    locale). Raises ``OSError`` when the file cannot be read and ``ValueError`` for anything wrong
    with its contents: not UTF-8 text, not JSON, or nested too deeply to parse (which would
    otherwise be a RecursionError), so that every reader reports a bad file in one line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
