"""Strict, all-or-nothing tensor conversion between diffusers and Flax NNX.

``convert_flat`` does the work and returns ``{path_tuple: np.ndarray}``;
``convert_tensors`` wraps it and returns an ``nnx.State`` shaped like the abstract state
(leaves are ``jax.Array``), ready for ``nnx.merge(graphdef, state)``.
``export_tensors`` goes back: dotted NNX paths -> diffusers keys, through inverse transforms.

Every problem (unmatched / ambiguous key, extra tensor, missing tensor, wrong rank or
shape, disallowed dtype, NaN / Inf values) is collected and raised together in one
:class:`ConversionError`; nothing is returned unless every check passed.

Tensors are read lazily, one at a time (``source.get_tensor(key)`` or ``source[key]``), so
peak memory stays near one copy of the checkpoint plus one tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping as TMapping, Optional

import numpy as np

from .mapping import Mapping, Rule
from .transforms import TransformError

__all__ = [
    "ConversionError",
    "ALLOWED_DTYPES",
    "Target",
    "abstract_targets",
    "convert_flat",
    "default_workers",
    "convert_tensors",
    "fill_state",
    "export_tensors",
    "LazyExport",
    "state_to_flat_dict",
    "path_to_str",
]

#: dtype names accepted in a checkpoint (ml_dtypes bfloat16 is not an np.floating subtype,
#: so dtypes are compared by name).
ALLOWED_DTYPES: frozenset[str] = frozenset({"float32", "float16", "bfloat16"})
_FLOAT_NAMES = ALLOWED_DTYPES | {"float64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                 "float8_e5m2fnuz", "float8_e4m3b11fnuz", "float128"}


class ConversionError(ValueError):
    """All problems found in one conversion, one per line."""

    def __init__(self, problems: list[str], header: str = "conversion failed"):
        self.problems = list(problems)
        self.header = header
        super().__init__(
            f"{header}: {len(self.problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in self.problems)
        )


@contextlib.contextmanager
def with_config_problems(config_error: Optional[Exception], config_path: Any) -> Iterator[None]:
    """Around the conversion of a source's tensors: one error naming every problem of the source.
    ``config_error`` (a config whose only problem is an unknown key, see
    ``VAEConfig.from_json_file_ignoring_unknown``) joins the tensors' problems against the
    architecture it still gives (a ConversionError from the block), or is raised after the block
    when the tensors have none."""
    try:
        yield
    except ConversionError as e:
        if config_error is None:
            raise
        problems = list(getattr(config_error, "problems", None) or [str(config_error)])
        raise ConversionError([f"{config_path}: {p}" for p in problems] + e.problems, header=e.header) from None
    if config_error is not None:
        raise config_error


def path_to_str(path: Iterable[Any]) -> str:
    """``('encoder', 'down_blocks', 0, 'conv')`` -> ``'encoder.down_blocks.0.conv'``."""
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------------------
# source access
# ----------------------------------------------------------------------------------------


def _reader(source: Any) -> tuple[list[str], Callable[[str], Any]]:
    """Keys and a per-key getter of a tensor source.

    Accepted: any mapping-like with ``.keys()`` and ``.get_tensor(key)`` (e.g. a
    ``safetensors.safe_open(..., framework="numpy")`` handle) or ``[key]`` / ``.get(key)``
    (e.g. a dict of numpy arrays); or a ``(keys, getter)`` pair.
    """
    if isinstance(source, tuple) and len(source) == 2 and callable(source[1]):
        return list(source[0]), source[1]
    keys = list(source.keys())
    if hasattr(source, "read_tensor"):  # our safetensors readers: a fresh, aligned copy per tensor
        return keys, source.read_tensor
    if hasattr(source, "get_tensor"):
        return keys, source.get_tensor
    if hasattr(source, "__getitem__"):
        return keys, source.__getitem__
    return keys, source.get


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor slipped in: be helpful but exact
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def dtype_problem(dtype: Any, allowed: frozenset[str] = ALLOWED_DTYPES) -> str | None:
    """Why a tensor of ``dtype`` cannot be converted, saved or exported (None: it can)."""
    return _dtype_problem(np.zeros(0, dtype), allowed)


def _dtype_problem(arr: np.ndarray, allowed: frozenset[str]) -> str | None:
    name = arr.dtype.name
    if name in allowed:
        return None
    if name in _FLOAT_NAMES:
        return f"dtype {name} not allowed (allowed: {', '.join(sorted(allowed))})"
    return f"dtype {name} is not floating point (allowed: {', '.join(sorted(allowed))})"


def _nonfinite_problem(arr: np.ndarray) -> str | None:
    finite = np.isfinite(arr)
    if finite.all():
        return None
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    n_inf = int(arr.size - np.count_nonzero(finite) - n_nan)
    return f"contains non-finite values: {n_nan} NaN, {n_inf} Inf (of {arr.size})"


def _finfo(dtype: Any):
    import ml_dtypes  # numpy's finfo does not know bfloat16

    return ml_dtypes.finfo(dtype)


def narrows(src: Any, dst: Any) -> bool:
    """Whether casting floats of dtype ``src`` to ``dst`` can overflow (``dst`` holds smaller
    magnitudes: float32 -> float16, and float32 -> bfloat16 at the very top of the range)."""
    return float(_finfo(_np_dtype(dst)).max) < float(_finfo(_np_dtype(src)).max)


def overflow_problem(dtype: Any, n_overflow: int, size: int, largest: float) -> str | None:
    """The problem of a cast that turned ``n_overflow`` finite values of a tensor into +-Inf."""
    if not n_overflow:
        return None
    d = _np_dtype(dtype)
    return (f"does not fit {d.name}: {n_overflow} of {size} finite values overflow to Inf when cast "
            f"(largest magnitude {largest:.6g}; {d.name} holds up to {float(_finfo(d).max):.6g})")


def cast_checked(arr: np.ndarray, dtype: Any) -> tuple[np.ndarray, str | None]:
    """``arr`` (finite: checked before) cast to ``dtype``, and the problem if a value overflowed
    (a finite float32 weight of 1e5 is Inf in float16). None when the cast is exact or rounds."""
    d = _np_dtype(dtype)
    with np.errstate(over="ignore"):  # reported below, with the tensor's name
        y = arr.astype(d)
    if not y.size or not narrows(arr.dtype, d):
        return y, None
    bad = int(y.size - np.count_nonzero(np.isfinite(y)))
    largest = float(np.max(np.abs(arr.astype(np.float64)))) if bad else 0.0
    return y, overflow_problem(d, bad, y.size, largest)


def value_problem(arr: np.ndarray, allowed: frozenset[str] = ALLOWED_DTYPES) -> str | None:
    """What no converted, saved or exported tensor may have: a dtype outside ``allowed``, else a
    non-finite value. None when the tensor is fine."""
    return _dtype_problem(arr, allowed) or (_nonfinite_problem(arr) if arr.size else None)


# ----------------------------------------------------------------------------------------
# abstract state
# ----------------------------------------------------------------------------------------


class Target:
    """One parameter to fill: its path tuple, expected shape and the abstract variable."""

    __slots__ = ("path", "shape", "dtype", "variable")

    def __init__(self, path: tuple, shape: tuple[int, ...], dtype: Any = None, variable: Any = None):
        self.path = tuple(path)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.variable = variable


def abstract_targets(abstract_state: Any) -> dict[str, Target]:
    """Dotted path -> :class:`Target` for every leaf of ``abstract_state``.

    ``abstract_state`` is either an ``nnx.State`` (leaves: nnx Variables holding
    ``jax.ShapeDtypeStruct`` or arrays) or a plain ``{path_tuple_or_dotted_str: shape-like}``
    dict, where shape-like is anything with ``.shape`` (and optionally ``.dtype``) or a tuple.
    """
    out: dict[str, Target] = {}
    if isinstance(abstract_state, dict) and not hasattr(abstract_state, "flat_state"):
        items = abstract_state.items()
    else:
        from flax import nnx

        items = nnx.to_flat_state(abstract_state)
    for path, leaf in items:
        if isinstance(path, str):
            path = tuple(int(p) if p.isdigit() else p for p in path.split("."))
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        if isinstance(value, tuple):
            shape, dtype = value, None
        else:
            shape, dtype = tuple(value.shape), getattr(value, "dtype", None)
        out[path_to_str(path)] = Target(tuple(path), shape, dtype, leaf)
    return out


# One wording for a parameter set that does not fit its config's architecture, wherever it is
# checked (conversion, load, save, export, validation).
def extra_problem(source_name: str, key: str, shape: tuple) -> str:
    return (f"{source_name}: parameter {key!r} {tuple(shape)}: not part of the CogVideoX VAE architecture of its "
            "config (extra)")


def shape_problem(source_name: str, key: str, shape: tuple, want: tuple) -> str:
    return f"{source_name}: parameter {key!r}: shape {tuple(shape)}, the config's architecture has {tuple(want)}"


def missing_problem(source_name: str, key: str, want: tuple) -> str:
    return f"{source_name}: parameter {key!r} {tuple(want)}: missing"


def architecture_problems(shapes: TMapping[str, tuple], expected: TMapping[str, tuple], source_name: str) -> list[str]:
    """Every way the parameter shapes ``shapes`` ({dotted path: shape}) fail the architecture
    ``expected`` ({dotted path: shape}, see :func:`expected_shapes`): extra, of another shape,
    missing; one line each, extra and misshapen in key order, then the missing ones."""
    problems = []
    for key in sorted(shapes):
        want = expected.get(key)
        if want is None:
            problems.append(extra_problem(source_name, key, shapes[key]))
        elif tuple(shapes[key]) != tuple(want):
            problems.append(shape_problem(source_name, key, shapes[key], want))
    problems += [missing_problem(source_name, k, w) for k, w in expected.items() if k not in shapes]
    return problems


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of every parameter ``config``'s architecture has (shapes only: built
    with ``abstract_model``, no weights allocated)."""
    from flax import nnx

    from cogvae.model import abstract_model

    return {k: t.shape for k, t in abstract_targets(nnx.split(abstract_model(config))[1]).items()}


# ----------------------------------------------------------------------------------------
# diffusers -> NNX
# ----------------------------------------------------------------------------------------


def default_workers() -> int:
    """Threads for per-tensor work (reading, transforming, hashing): numpy copies, ``pread``,
    the finiteness check and hashlib release the GIL, so it runs on every core (capped at 8)."""
    import os

    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def convert_flat(
    source: Any,
    abstract_state: Any,
    mapping: Mapping,
    *,
    dtype: Any = None,
    source_name: str = "<file>",
    allowed_dtypes: Iterable[str] = ALLOWED_DTYPES,
    workers: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
    file_of: Callable[[str], Any] | None = None,
    source_problems: Iterable[str] | None = None,
    unreadable: Mapping[str, Any] | None = None,
) -> dict[tuple, np.ndarray]:
    """Convert every tensor of ``source`` for ``abstract_state``; strict.

    Returns ``{path_tuple: np.ndarray}`` covering exactly the leaves of ``abstract_state``
    (see :func:`abstract_targets`). Source dtype is kept unless ``dtype`` is given (cast
    after the transform). Raises :class:`ConversionError` listing every problem, in source
    key order.

    Keys are matched to rules first, without reading any data. Then the matched tensors are
    read, checked and transformed by ``workers`` threads (default :func:`default_workers`), at
    most twice that many in flight, so memory stays near one copy of the weights. The getter must be
    safe to call from several threads (our safetensors readers and dicts are).
    ``on_tensor(key)`` is called in the calling thread as each tensor is done (progress bars).
    ``file_of(key)``: the file a tensor is in, named by its problems instead of ``source_name``
    (default: the source's own ``file_of``, the shard of a sharded safetensors).
    ``source_problems`` / ``unreadable`` (default: the source's own, from
    ``open_safetensors(..., strict=False)``): the problems of the files themselves, which lead the
    error, and the keys the files name but cannot give (a missing shard, a broken header entry).
    Those keys are still matched to rules, so they count as present (no "missing tensor" for
    them) and an unmatched or extra one is still named; the readable tensors are all checked.
    """
    import concurrent.futures

    allowed = frozenset(allowed_dtypes)
    cast = None if dtype is None else _np_dtype(dtype)
    targets = abstract_targets(abstract_state)
    keys, get = _reader(source)
    file_problems = list(getattr(source, "problems", ()) if source_problems is None else source_problems)
    unreadable = dict(getattr(source, "unreadable", {}) if unreadable is None else unreadable)
    readable = set(keys)
    keys = list(keys) + sorted(k for k in unreadable if k not in readable)
    problems_of: dict[str, list[str]] = {k: [] for k in keys}
    jobs: list[tuple[str, Rule, Target]] = []
    filled_by: dict[str, str] = {}

    # a sharded source names the shard each tensor is in (``ShardedSafetensors.file_of``)
    file_of = file_of or getattr(source, "file_of", None)

    def bad(key: str, msg: str) -> None:
        where = source_name
        if file_of is not None:
            try:
                where = str(file_of(key))
            except KeyError:
                pass
        problems_of[key].append(f"{where}: tensor {key!r}: {msg}")

    for key in keys:
        matches = mapping.match_forward(key)
        if not matches:
            bad(key, f"matches no rule of mapping {mapping.path}")
            continue
        if len(matches) > 1:
            bad(key, f"matches {len(matches)} rules of mapping {mapping.path}: "
                     + ", ".join(r.label for _, r in matches))
            continue
        tpath, rule = matches[0]
        tgt = targets.get(tpath)
        if tgt is None:
            bad(key, f"extra tensor: maps to {tpath!r} by {rule.label}, which is not a "
                     "parameter of the model")
            continue
        if tpath in filled_by:
            bad(key, f"maps to {tpath!r}, already filled from {filled_by[tpath]!r}")
            continue
        filled_by[tpath] = key
        if key in readable:
            jobs.append((key, rule, tgt))

    def work(job: tuple[str, Rule, Target]) -> tuple[list[str], np.ndarray | None]:
        key, rule, tgt = job
        msgs: list[str] = []
        arr = _to_numpy(get(key))
        src_shape = tuple(arr.shape)
        try:
            got = rule.transform.shape(src_shape)
        except TransformError:
            got = None
        if got != tgt.shape:
            inv = rule.inverse_transform
            want = inv.shape(tgt.shape) if inv.rank in (None, len(tgt.shape)) else "?"
            msgs.append(f"shape mismatch: source shape {src_shape}, expected {want} "
                        f"(model parameter {path_to_str(tgt.path)!r} has shape {tgt.shape}; {rule.label})")
        # A float64 source (diffusers loads one) is converted when a dtype to cast to is given: the
        # cast is checked like any narrowing one (a finite value that would overflow is refused).
        vp = value_problem(arr, allowed | {"float64"} if cast is not None else allowed)
        if vp and arr.dtype == np.float64 and cast is None and "float64" not in allowed:
            vp += "; cast it with dtype= (cogvae-convert --dtype float32)"  # (the dtype problem, not a NaN)
        if vp:
            msgs.append(vp)
        if msgs:
            return msgs, None
        y = rule.transform(arr)
        del arr
        if cast is not None and y.dtype != cast:
            y, problem = cast_checked(y, cast)
            if problem:
                return [problem], None
        return [], y

    out: dict[tuple, np.ndarray] = {}
    n = max(1, workers or default_workers())
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        pending: dict[concurrent.futures.Future, tuple[str, Rule, Target]] = {}
        todo = iter(jobs)

        def submit_next() -> None:
            job = next(todo, None)
            if job is not None:
                pending[pool.submit(work, job)] = job

        for _ in range(2 * n):  # bounded in flight: at most ~2n tensors read but not yet stored
            submit_next()
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                key, _rule, tgt = pending.pop(fut)
                msgs, y = fut.result()
                for m in msgs:
                    bad(key, m)
                if y is not None:
                    out[tgt.path] = y
                if on_tensor is not None:
                    on_tensor(key)
                submit_next()

    problems = file_problems + [p for k in keys for p in problems_of[k]]
    for tpath, tgt in targets.items():
        if tpath not in filled_by:
            matches = mapping.match_reverse(tpath)
            hint = (f" (expected source key {matches[0][0]!r})" if len(matches) == 1
                    else " (no rule maps to this path)" if not matches else "")
            problems.append(f"{source_name}: missing tensor for model parameter "
                            f"{tpath!r}{hint}")
    if problems:
        raise ConversionError(problems, header=f"cannot convert {source_name}")
    # the model's own parameter order, whatever order the threads finished in
    return {tgt.path: out[tgt.path] for tgt in targets.values() if tgt.path in out}


def fill_state(abstract_state: Any, flat: dict[tuple, Any], *, to_jax: bool = True, adopt: bool = False) -> Any:
    """Build an ``nnx.State`` like ``abstract_state`` with leaves from ``flat``
    (``{path_tuple: array}``, e.g. from :func:`convert_flat`). Arrays become
    ``jax.Array`` (one at a time) unless ``to_jax=False``. ``adopt=True``: the arrays are
    owned by nobody else, so on CPU the jax arrays may take over their buffers (no copy); the
    entries are popped from ``flat``."""
    from flax import nnx

    if to_jax:
        import jax.numpy as jnp

        from .checkpoint import adopt_array
    pairs = []
    for path, var in nnx.to_flat_state(abstract_state):
        v = flat.pop(tuple(path)) if adopt else flat[tuple(path)]
        if to_jax:
            v = adopt_array(v) if adopt else jnp.asarray(v)
        pairs.append((path, var.replace(v)))
    return nnx.from_flat_state(pairs)


def convert_tensors(
    source: Any,
    abstract_state: Any,
    mapping: Mapping,
    *,
    dtype: Any = None,
    source_name: str = "<file>",
    allowed_dtypes: Iterable[str] = ALLOWED_DTYPES,
) -> Any:
    """Strict conversion to an ``nnx.State`` (jax arrays) shaped like ``abstract_state``.

    ``abstract_state``: the state of ``nnx.split(nnx.eval_shape(lambda: Model(...)))``.
    Raises :class:`ConversionError` (all problems at once) before anything is built.
    """
    flat = convert_flat(source, abstract_state, mapping, dtype=dtype,
                        source_name=source_name, allowed_dtypes=allowed_dtypes)
    # Arrays read by our safetensors readers are fresh copies that only we hold: adopt them.
    return fill_state(abstract_state, flat, adopt=hasattr(source, "read_tensor"))


# ----------------------------------------------------------------------------------------
# NNX -> diffusers
# ----------------------------------------------------------------------------------------


def state_to_flat_dict(state: Any) -> dict[str, np.ndarray]:
    """``nnx.State`` -> ``{dotted path: np.ndarray}`` (bf16 stays ml_dtypes.bfloat16)."""
    from flax import nnx

    return {path_to_str(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for p, v in nnx.to_flat_state(state)}


def export_tensors(
    flat_params: dict[str, np.ndarray],
    mapping: Mapping,
    *,
    allowed_dtypes: Iterable[str] = ALLOWED_DTYPES,
    source_name: str = "<model>",
    lazy: bool = False,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """``{dotted NNX path: array}`` -> ``{diffusers key: array}`` through inverse transforms.

    Strict: a path matching no rule or several rules, a rank mismatch, a disallowed dtype, a
    non-finite value, or two paths producing the same key is an error; all are raised together.
    ``dtype`` (None: keep each tensor's): cast every tensor to 'float32', 'bfloat16' or 'float16';
    a finite value the cast would turn into Inf is a problem too. ``lazy=True``: after the checks,
    return a :class:`LazyExport` that transforms each tensor when it is read (a streaming writer
    then holds one exported tensor at a time).
    """
    allowed = frozenset(allowed_dtypes)
    if dtype is not None:
        from cogvae.model import resolve_dtype  # the one dtype check of every entry point

        dtype = resolve_dtype(dtype)
    target = None if dtype is None else np.dtype(dtype)
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for path, value in flat_params.items():
        path = path if isinstance(path, str) else path_to_str(path)
        matches = mapping.match_reverse(path)
        if len(matches) != 1:
            problems.append(
                f"{source_name}: parameter {path!r}: "
                + (f"matches no rule of mapping {mapping.path}" if not matches else
                   f"matches {len(matches)} rules of mapping {mapping.path}: "
                   + ", ".join(r.label for _, r in matches)))
            continue
        key, rule = matches[0]
        if key in origin:
            problems.append(f"{source_name}: parameter {path!r}: maps to {key!r}, "
                            f"already produced from {origin[key]!r}")
            continue
        origin[key] = path
        arr = _to_numpy(value)
        inv = rule.inverse_transform
        if inv.rank is not None and arr.ndim != inv.rank:
            problems.append(f"{source_name}: parameter {path!r}: wrong rank: shape "
                            f"{tuple(arr.shape)}, {inv.name} ({rule.label}) expects rank {inv.rank}")
            continue
        vp = value_problem(arr, allowed)
        if not vp and target is not None and arr.dtype != target and narrows(arr.dtype, target):
            # checked here, on a throwaway cast, so that nothing is written when any tensor fails
            # (the lazy writer casts again when it reaches the tensor: memory stays one copy)
            vp = cast_checked(arr, target)[1]
        if vp:
            problems.append(f"{source_name}: parameter {path!r}: {vp}")
            continue
        cast = target if target is not None and arr.dtype != target else None
        out[key] = (inv, arr, cast) if lazy else inv(arr if cast is None else arr.astype(cast))
    if problems:
        raise ConversionError(problems, header=f"cannot export {source_name}")
    return LazyExport(out) if lazy else out


class LazyExport(TMapping[str, np.ndarray]):
    """The result of ``export_tensors(..., lazy=True)``: every check has passed, and each tensor is
    transformed when it is read, once: reading ``[key]`` hands the array over and forgets it, so a
    writer that goes key by key holds one exported tensor at a time. ``shape_of`` / ``dtype_of``
    answer without transforming (a safetensors header is written before any tensor)."""

    def __init__(self, pending: dict[str, tuple[Any, np.ndarray, Any]]):
        self._pending = pending
        self._meta = {k: (tuple(inv.shape(a.shape)), a.dtype if cast is None else cast)
                      for k, (inv, a, cast) in pending.items()}

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype_of(self, key: str) -> np.dtype:
        return self._meta[key][1]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._pending:
            raise KeyError(f"{key!r} (each exported tensor can be read once)" if key in self._meta else key)
        inv, arr, cast = self._pending.pop(key)
        return inv(arr if cast is None else arr.astype(cast))

    def __iter__(self):
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)
