"""enable_compilation_cache: a second process loads the decode kernels instead of compiling them.

Nothing is faked: two real Python processes, JAX's real persistent cache in a temporary folder,
the tiny diffusers-format VAE shipped with the package. Each process first compiles an unrelated
function, so the cache is turned on after JAX has already decided once whether to use it (the
late-call case the helper handles).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cogvae.model import compilation_cache as cc

SCRIPT = r"""
import hashlib, json, sys
import jax, jax.numpy as jnp, numpy as np
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
jax.jit(lambda v: v * 2)(jnp.ones(3)).block_until_ready()  # JAX has compiled (without a cache) before the call
from cogvae.converter import load
from cogvae.converter.convert import default_source
from cogvae.model import enable_compilation_cache
enable_compilation_cache(sys.argv[1], min_compile_time_s=0)
vae = load(default_source())
z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 4, 6, vae.config.latent_channels)), jnp.float32)
video = np.asarray(vae.decode(z))  # 5 latents: the first-batch kernel and the scan
print(json.dumps({"hits": len(hits), "sha": hashlib.sha256(video.tobytes()).hexdigest()}))
"""


def _run(cache: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("COGVAE_CONV_IMPL", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_decode_kernels(tmp_path):
    cache = tmp_path / "cache"
    first = _run(cache)
    names = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert "jit__first_fn" in names and "jit__scan_fn" in names, names
    second = _run(cache)
    # Every executable the second process compiled came from the cache (the decode kernels
    # among them), none was added, and the decoded bytes are the first process's.
    assert first["hits"] == 0 and second["hits"] == len(names), (first, second, names)
    assert len(list(cache.iterdir())) == len(names)
    assert second["sha"] == first["sha"]


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV_VAR, str(tmp_path / "from-env"))
    assert cc.default_cache_dir() == tmp_path / "from-env"
    monkeypatch.delenv(cc.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.default_cache_dir() == tmp_path / "xdg" / "cogvae" / "jax"
    with pytest.raises(ValueError, match="min_compile_time_s"):
        cc.enable_compilation_cache(tmp_path, min_compile_time_s=-1)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(min_compile_time_s=float("nan")), ValueError, "finite number of seconds >= 0, got nan"),
    (dict(min_compile_time_s="1"), ValueError, "finite number of seconds >= 0, got '1'"),
    (dict(min_compile_time_s=-1), ValueError, "got -1"),
    (dict(path="{file}"), ValueError, "exists and is not a folder"),
    # Path("") is the working directory: the cache went wherever the process ran
    (dict(path=""), ValueError, "an empty path; pass None"),
    (dict(path="  "), ValueError, "an empty path; pass None"),
])
def test_bad_arguments_are_refused_before_anything_changes(tmp_path, kwargs, error, message):
    import jax

    from cogvae.model import enable_compilation_cache

    (tmp_path / "file").write_text("x")
    kwargs = {k: (v.format(file=tmp_path / "file") if isinstance(v, str) and "{" in v else v) for k, v in kwargs.items()}
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(error, match=message):
        enable_compilation_cache(**({"path": tmp_path / "cache"} | kwargs))
    assert jax.config.jax_compilation_cache_dir == before
