"""Keep the compiled encode/decode kernels on disk across processes.

A full-size decode compiles two kernels the first time it meets a shape (17 s on an H200 at 2b
scale, 45 s for exact tiles; see bench/RESULTS.md), and a new Python process compiles them again.
JAX's persistent compilation cache stores each compiled executable under a key made of the
computation, the compiler options (the scan's own XLA options included), the jax/jaxlib version
and the device kind, so a later process on the same software and device loads it instead of
compiling. It is JAX's process-wide setting: once enabled, every jit of the process is eligible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import jax

__all__ = ["enable_compilation_cache", "default_cache_dir"]

ENV_VAR = "COGVAE_COMPILATION_CACHE"


def default_cache_dir() -> Path:
    """``$COGVAE_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/cogvae/jax`` (``~/.cache/cogvae/jax``)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cogvae" / "jax"


def enable_compilation_cache(path: Optional[Union[str, os.PathLike]] = None, *, min_compile_time_s: float = 1.0) -> Path:
    """Turn on JAX's persistent compilation cache in ``path`` (default: ``default_cache_dir()``).

    Executables that took at least ``min_compile_time_s`` to compile are written there (the
    decode kernels take seconds; JAX's op-by-op dispatch compiles are left out). Call it before
    the first decode of the process; called later, it still applies to every compile that follows
    (JAX is told to re-read its cache settings). Returns the directory, created if missing.
    """
    import math

    if isinstance(min_compile_time_s, bool) or not isinstance(min_compile_time_s, (int, float)) \
            or not math.isfinite(min_compile_time_s) or min_compile_time_s < 0:
        raise ValueError(f"min_compile_time_s must be a finite number of seconds >= 0, got {min_compile_time_s!r}")
    if path is not None and not os.fspath(path).strip():
        # Path("") is the working directory: cache files would land wherever the process runs
        raise ValueError("compilation cache: an empty path; pass None (or nothing) for the default folder")
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"compilation cache {directory}: exists and is not a folder") from None
    except OSError as e:
        raise OSError(e.errno, f"compilation cache {directory}: cannot create the folder: {e.strerror or e}") from None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    # JAX decides once per process whether the cache is in use, at its first compile; without a
    # reset, a process that compiled anything before this call would never use the cache.
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()
    return directory
