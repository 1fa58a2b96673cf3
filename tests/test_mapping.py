"""Mapping table, transforms and strict conversion engine (diffusers <-> NNX)."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from cogvae.converter.engine import (
    ConversionError,
    convert_flat,
    convert_tensors,
    export_tensors,
    path_to_str,
    state_to_flat_dict,
)
from cogvae.converter.mapping import (
    KeyMatchError,
    MappingError,
    default_mapping_path,
    load_mapping,
    parse_mapping,
)
from cogvae.converter.transforms import TRANSFORMS

SMALL_CONFIG = dict(
    block_out_channels=(8, 16),
    down_block_types=("CogVideoXDownBlock3D",) * 2,
    up_block_types=("CogVideoXUpBlock3D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=3,
    use_quant_conv=True,
    use_post_quant_conv=True,
)

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def _torch_sd_to_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _diffusers_vae(**config):
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(**config)


@pytest.fixture(scope="module")
def mapping():
    return load_mapping()


@pytest.fixture(scope="module")
def full_vae():
    return _diffusers_vae()


@pytest.fixture(scope="module")
def full_sd(full_vae):
    return _torch_sd_to_numpy(full_vae)


@pytest.fixture(scope="module")
def small_vae():
    return _diffusers_vae(**SMALL_CONFIG)


@pytest.fixture(scope="module")
def small_sd(small_vae):
    return _torch_sd_to_numpy(small_vae)


def expected_targets(sd: dict[str, np.ndarray], mapping) -> dict[str, tuple[int, ...]]:
    """Stand-in abstract state: dotted NNX path -> shape, derived by applying the rules."""
    out = {}
    for key, arr in sd.items():
        path, rule = mapping.forward_key(key)
        out[path] = rule.transform.shape(arr.shape)
    return out


# ----------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------

_SHAPES = {None: (3, 5, 2), 5: (7, 3, 2, 4, 5), 4: (7, 3, 4, 5), 2: (7, 3)}


def test_lazy_export_streams_into_safetensors(small_sd, mapping, tmp_path):
    """export_tensors(lazy=True): shapes and dtypes known up front, each tensor made once when read,
    and the safetensors written from it equal the eager export's, byte for byte."""
    from cogvae.converter.st_io import open_safetensors, save_safetensors

    targets = expected_targets(small_sd, mapping)
    flat = {path_to_str(p): a for p, a in convert_flat(small_sd, targets, mapping).items()}
    eager = export_tensors(flat, mapping)
    lazy = export_tensors(flat, mapping, lazy=True)
    assert set(lazy) == set(eager) and len(lazy) == len(eager)
    for k in eager:
        assert lazy.shape_of(k) == eager[k].shape and lazy.dtype_of(k) == eager[k].dtype
    save_safetensors(eager, tmp_path / "eager.safetensors")
    save_safetensors(lazy, tmp_path / "lazy.safetensors")
    assert (tmp_path / "lazy.safetensors").read_bytes() == (tmp_path / "eager.safetensors").read_bytes()
    with pytest.raises(KeyError, match="can be read once"):
        lazy[next(iter(eager))]
    back = open_safetensors(tmp_path / "lazy.safetensors")
    assert all(back[k].tobytes() == small_sd[k].tobytes() for k in small_sd)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_round_trip(name, dtype):
    t = TRANSFORMS[name]
    inv = TRANSFORMS[t.inverse]
    assert inv.inverse == name
    rng = np.random.default_rng(0)
    x = rng.standard_normal(_SHAPES[t.rank]).astype(dtype)
    y = t(x)
    assert y.shape == t.shape(x.shape)
    assert y.dtype == x.dtype
    assert y.flags["C_CONTIGUOUS"]
    z = inv(y)
    assert z.shape == inv.shape(y.shape) == x.shape
    assert z.dtype == x.dtype
    assert z.tobytes() == x.tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(37, 5, 3, 3, 3), (16, 4, 3, 3, 3), (17, 3, 1, 3, 3), (33, 6, 3, 3), (40, 7, 2)])
def test_blocked_permute_equals_numpy_transpose(shape, dtype):
    """permute copies output channels in blocks; every permutation, including the ragged last
    block, must give numpy's bytes, C-contiguous and 64-byte aligned when blocked."""
    import itertools

    from cogvae.converter.transforms import permute

    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    for perm in itertools.permutations(range(len(shape))):
        y = permute(x, perm)
        want = np.ascontiguousarray(np.transpose(x, perm))
        assert y.shape == want.shape and y.dtype == want.dtype and y.flags["C_CONTIGUOUS"]
        assert y.tobytes() == want.tobytes(), perm
        if perm[-1] == 0 and shape[0] > 16:
            assert y.ctypes.data % 64 == 0


def test_transform_layouts():
    x = np.arange(2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)  # O,I,T,H,W
    k = TRANSFORMS["conv3d_oithw_to_thwio"](x)
    assert k.shape == (4, 5, 6, 3, 2)
    assert k[1, 2, 3, 1, 0] == x[0, 1, 1, 2, 3]
    w = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # O,I,H,W
    k2 = TRANSFORMS["conv2d_oihw_to_hwio"](w)
    assert k2.shape == (4, 5, 3, 2)
    assert k2[3, 4, 2, 1] == w[1, 2, 3, 4]
    l = np.arange(6).reshape(2, 3)
    assert TRANSFORMS["linear_oi_to_io"](l).shape == (3, 2)


def test_transform_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"expects a rank-5 tensor, got rank 4"):
        TRANSFORMS["conv3d_oithw_to_thwio"].shape((1, 2, 3, 4))


# ----------------------------------------------------------------------------------------
# mapping table on real diffusers keys
# ----------------------------------------------------------------------------------------


def test_packaged_mapping_file(mapping):
    import hashlib

    assert Path(mapping.path) == default_mapping_path()
    assert Path(mapping.path).name == "cogvideox_vae.yaml"
    assert mapping.sha256 == hashlib.sha256(Path(mapping.path).read_bytes()).hexdigest()
    assert len({r.name for r in mapping.rules}) == len(mapping.rules)


def test_full_config_key_count(full_sd):
    assert len(full_sd) == 436
    assert sum(v.size for v in full_sd.values()) == 215_583_907


@pytest.mark.parametrize("which", ["full", "small"])
def test_every_key_matches_exactly_one_rule_both_ways(which, mapping, request):
    sd = request.getfixturevalue(f"{which}_sd")
    paths = {}
    for key in sd:
        fwd = mapping.match_forward(key)
        assert len(fwd) == 1, (key, [r.name for _, r in fwd])
        path, rule = fwd[0]
        paths[path] = key
        rev = mapping.match_reverse(path)
        assert len(rev) == 1, (path, [r.name for _, r in rev])
        assert rev[0] == (key, rule)
    assert len(paths) == len(sd)  # injective


def test_every_rule_is_used(full_sd, small_sd, mapping):
    used = {mapping.forward_key(k)[1].name for k in [*full_sd, *small_sd]}
    assert used == {r.name for r in mapping.rules}


@pytest.mark.parametrize(
    "key, path, transform",
    [
        ("encoder.conv_in.conv.weight", "encoder.conv_in.conv.kernel", "conv3d_oithw_to_thwio"),
        ("decoder.up_blocks.2.resnets.1.norm2.conv_y.conv.bias",
         "decoder.up_blocks.2.resnets.1.norm2.conv_y.conv.bias", "identity"),
        ("encoder.down_blocks.0.downsamplers.0.conv.weight",
         "encoder.down_blocks.0.downsamplers.0.conv.kernel", "conv2d_oihw_to_hwio"),
        ("decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
         "decoder.up_blocks.1.resnets.0.conv_shortcut.kernel", "conv3d_oithw_to_thwio"),
        ("post_quant_conv.weight", "post_quant_conv.kernel", "conv3d_oithw_to_thwio"),
        ("encoder.mid_block.resnets.0.norm1.weight", "encoder.mid_block.resnets.0.norm1.scale",
         "identity"),
        ("encoder.norm_out.bias", "encoder.norm_out.bias", "identity"),
        ("decoder.norm_out.norm_layer.weight", "decoder.norm_out.norm_layer.scale", "identity"),
        ("decoder.mid_block.resnets.1.norm1.norm_layer.bias",
         "decoder.mid_block.resnets.1.norm1.norm_layer.bias", "identity"),
    ],
)
def test_known_keys(mapping, key, path, transform):
    got, rule = mapping.forward_key(key)
    assert got == path
    assert rule.transform.name == transform
    assert mapping.reverse_key(path)[0] == key


def test_forward_key_errors(mapping):
    with pytest.raises(KeyMatchError, match=r"source key 'encoder\.bogus\.weight' matches no rule"):
        mapping.forward_key("encoder.bogus.weight")
    with pytest.raises(KeyMatchError, match=r"target path 'decoder\.norm_out\.scale' matches no rule"):
        mapping.reverse_key("decoder.norm_out.scale")


# ----------------------------------------------------------------------------------------
# conversion round trip
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["full", "small"])
def test_convert_then_export_is_bit_identical(which, mapping, request):
    sd = request.getfixturevalue(f"{which}_sd")
    targets = expected_targets(sd, mapping)
    flat = convert_flat(sd, targets, mapping, source_name=f"{which}.safetensors")
    assert {path_to_str(p) for p in flat} == set(targets)
    for p, arr in flat.items():
        assert arr.shape == targets[path_to_str(p)]
        assert arr.dtype == np.float32
    back = export_tensors({path_to_str(p): a for p, a in flat.items()}, mapping)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].shape == sd[k].shape
        assert back[k].dtype == sd[k].dtype
        assert back[k].tobytes() == sd[k].tobytes(), k


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_keeps_source_dtype(dtype, small_sd, mapping):
    sd = {k: v.astype(dtype) for k, v in small_sd.items()}
    flat = convert_flat(sd, expected_targets(sd, mapping), mapping)
    assert all(a.dtype == np.dtype(dtype) for a in flat.values())
    back = export_tensors({path_to_str(p): a for p, a in flat.items()}, mapping)
    assert all(back[k].dtype == np.dtype(dtype) and back[k].tobytes() == sd[k].tobytes() for k in sd)


def test_dtype_cast_after_transform(small_sd, mapping):
    flat = convert_flat(small_sd, expected_targets(small_sd, mapping), mapping, dtype="bfloat16")
    assert all(a.dtype == np.dtype(ml_dtypes.bfloat16) for a in flat.values())
    key = "encoder.conv_in.conv.weight"
    got = flat[("encoder", "conv_in", "conv", "kernel")]
    want = TRANSFORMS["conv3d_oithw_to_thwio"](small_sd[key]).astype(ml_dtypes.bfloat16)
    assert got.tobytes() == want.tobytes()


def test_lazy_source_reads_each_tensor_once(small_sd, mapping):
    reads = []

    def getter(key):
        reads.append(key)
        return small_sd[key]

    convert_flat((list(small_sd), getter), expected_targets(small_sd, mapping), mapping)
    assert sorted(reads) == sorted(small_sd)


def test_convert_from_safetensors_file(small_sd, mapping, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    f = tmp_path / "vae.safetensors"
    save_file(small_sd, str(f))
    with safe_open(str(f), framework="numpy") as src:
        flat = convert_flat(src, expected_targets(small_sd, mapping), mapping, source_name=str(f))
    back = export_tensors({path_to_str(p): a for p, a in flat.items()}, mapping)
    assert all(back[k].tobytes() == small_sd[k].tobytes() for k in small_sd)


def test_convert_tensors_returns_nnx_state(small_sd, mapping):
    import jax
    from flax import nnx

    pairs = []
    for path, shape in expected_targets(small_sd, mapping).items():
        tup = tuple(int(p) if p.isdigit() else p for p in path.split("."))
        pairs.append((tup, nnx.Param(jax.ShapeDtypeStruct(shape, np.float32))))
    abstract = nnx.from_flat_state(pairs)
    state = convert_tensors(small_sd, abstract, mapping)
    flat = state_to_flat_dict(state)
    back = export_tensors(flat, mapping)
    assert all(back[k].tobytes() == small_sd[k].tobytes() for k in small_sd)


# ----------------------------------------------------------------------------------------
# against the real NNX model (cogvae.model) -- no skip: fails until the model exists
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["small", "full"])
def test_real_abstract_model_round_trip(which, mapping, request):
    from flax import nnx

    from cogvae.model import AutoencoderKLCogVideoX, VAEConfig

    vae = request.getfixturevalue(f"{which}_vae")
    sd = request.getfixturevalue(f"{which}_sd")
    cfg = VAEConfig.from_diffusers_config(dict(vae.config))
    abstract_model = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    # the model's parameter tree is exactly what the rules derive from diffusers
    model_shapes = {path_to_str(p): tuple(v.get_value().shape)
                    for p, v in nnx.to_flat_state(abstract_state)}
    assert model_shapes == expected_targets(sd, mapping)
    state = convert_tensors(sd, abstract_state, mapping, source_name=f"{which}.safetensors")
    model = nnx.merge(graphdef, state)
    back = export_tensors(state_to_flat_dict(nnx.state(model)), mapping)
    assert back.keys() == sd.keys()
    assert all(back[k].tobytes() == sd[k].tobytes() for k in sd)


# ----------------------------------------------------------------------------------------
# bad input: strict, exact errors
# ----------------------------------------------------------------------------------------

SRC = "ckpt.safetensors"


def _convert(sd, targets, mapping):
    return convert_flat(sd, targets, mapping, source_name=SRC)


def _problems(excinfo) -> list[str]:
    return excinfo.value.problems


def test_missing_tensor(small_sd, mapping):
    targets = expected_targets(small_sd, mapping)
    sd = dict(small_sd)
    del sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    assert _problems(ei) == [
        f"{SRC}: missing tensor for model parameter 'decoder.up_blocks.0.upsamplers.0.conv.kernel'"
        " (expected source key 'decoder.up_blocks.0.upsamplers.0.conv.weight')"
    ]


def test_extra_tensor(small_sd, mapping):
    targets = expected_targets(small_sd, mapping)
    sd = dict(small_sd)
    sd["encoder.down_blocks.7.resnets.0.conv1.conv.bias"] = np.zeros(8, np.float32)
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    assert _problems(ei) == [
        f"{SRC}: tensor 'encoder.down_blocks.7.resnets.0.conv1.conv.bias': extra tensor: maps to "
        "'encoder.down_blocks.7.resnets.0.conv1.conv.bias' by rule #1 'causal_conv3d_bias', "
        "which is not a parameter of the model"
    ]


def test_wrong_shape(small_sd, mapping):
    targets = expected_targets(small_sd, mapping)
    sd = dict(small_sd)
    key = "encoder.conv_in.conv.weight"
    assert sd[key].shape == (8, 3, 3, 3, 3)
    sd[key] = np.zeros((8, 4, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    assert _problems(ei) == [
        f"{SRC}: tensor 'encoder.conv_in.conv.weight': shape mismatch: source shape "
        "(8, 4, 3, 3, 3), expected (8, 3, 3, 3, 3) (model parameter "
        "'encoder.conv_in.conv.kernel' has shape (3, 3, 3, 3, 8); rule #0 'causal_conv3d_weight')"
    ]


def test_wrong_rank(small_sd, mapping):
    targets = expected_targets(small_sd, mapping)
    sd = dict(small_sd)
    sd["quant_conv.weight"] = sd["quant_conv.weight"][:, :, 0]  # 4-D: torch Conv2d-like
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    assert _problems(ei) == [
        f"{SRC}: tensor 'quant_conv.weight': shape mismatch: source shape (6, 6, 1, 1), expected "
        "(6, 6, 1, 1, 1) (model parameter 'quant_conv.kernel' has shape (1, 1, 1, 6, 6); "
        "rule #6 'quant_conv_weight')"
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad, counts", [(np.nan, "2 NaN, 0 Inf"), (np.inf, "0 NaN, 2 Inf")])
def test_non_finite_tensor(small_sd, mapping, dtype, bad, counts):
    targets = expected_targets(small_sd, mapping)
    sd = {k: v.astype(dtype) for k, v in small_sd.items()}
    key = "decoder.norm_out.norm_layer.weight"
    sd[key] = sd[key].copy()
    sd[key][[0, 3]] = bad
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    n = sd[key].size
    assert _problems(ei) == [f"{SRC}: tensor '{key}': contains non-finite values: {counts} (of {n})"]


def test_non_float_dtype(small_sd, mapping):
    targets = expected_targets(small_sd, mapping)
    sd = dict(small_sd)
    sd["encoder.norm_out.bias"] = np.zeros(16, np.int32)
    sd["encoder.norm_out.weight"] = np.ones(16, np.float64)
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    assert _problems(ei) == [
        f"{SRC}: tensor 'encoder.norm_out.weight': dtype float64 not allowed "
        "(allowed: bfloat16, float16, float32); cast it with dtype= (cogvae-convert --dtype float32)",
        f"{SRC}: tensor 'encoder.norm_out.bias': dtype int32 is not floating point "
        "(allowed: bfloat16, float16, float32)",
    ]


def test_key_matching_no_rule(small_sd, mapping):
    targets = expected_targets(small_sd, mapping)
    sd = {**small_sd, "encoder.down_blocks.0.resnets.0.nonsense.weight": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    assert _problems(ei) == [
        f"{SRC}: tensor 'encoder.down_blocks.0.resnets.0.nonsense.weight': matches no rule of "
        f"mapping {mapping.path}"
    ]


def test_key_matching_two_rules(small_sd, tmp_path):
    text = default_mapping_path().read_text() + (
        "\n  - name: overlapping\n"
        '    source: "encoder.conv_in.conv.weight"\n'
        '    target: "encoder.conv_in.conv.kernel"\n'
        "    transform: conv3d_oithw_to_thwio\n"
    )
    m = parse_mapping(text, path="overlap.yaml")
    targets = expected_targets({k: v for k, v in small_sd.items() if k != "encoder.conv_in.conv.weight"}, m)
    targets["encoder.conv_in.conv.kernel"] = (3, 3, 3, 3, 8)
    with pytest.raises(ConversionError) as ei:
        _convert(small_sd, targets, m)
    assert _problems(ei) == [
        f"{SRC}: tensor 'encoder.conv_in.conv.weight': matches 2 rules of mapping overlap.yaml: "
        "rule #0 'causal_conv3d_weight', rule #12 'overlapping'",
        f"{SRC}: missing tensor for model parameter 'encoder.conv_in.conv.kernel'",
    ]


def test_all_problems_reported_together(small_sd, mapping):
    targets = expected_targets(small_sd, mapping)
    sd = dict(small_sd)
    del sd["encoder.conv_out.conv.bias"]
    sd["decoder.extra.conv1.conv.bias"] = np.zeros(3, np.float32)
    sd["what.is.this"] = np.zeros(3, np.float32)
    sd["encoder.norm_out.weight"] = np.full(16, np.nan, np.float32)
    sd["decoder.conv_in.conv.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError) as ei:
        _convert(sd, targets, mapping)
    probs = _problems(ei)
    assert len(probs) == 5
    msg = str(ei.value)
    assert msg.startswith(f"cannot convert {SRC}: 5 problem(s):\n")
    for needle in [
        "missing tensor for model parameter 'encoder.conv_out.conv.bias'",
        "tensor 'decoder.extra.conv1.conv.bias': extra tensor",
        "tensor 'what.is.this': matches no rule",
        "tensor 'encoder.norm_out.weight': contains non-finite values: 16 NaN, 0 Inf (of 16)",
        "tensor 'decoder.conv_in.conv.bias': shape mismatch: source shape (7,), expected (16,)",
    ]:
        assert sum(needle in p for p in probs) == 1, needle
    assert len(msg.splitlines()) == 6  # header + one line per problem
    assert all(line.startswith(f"  - {SRC}: ") for line in msg.splitlines()[1:])


def test_export_unmatched_path(small_sd, mapping):
    flat = convert_flat(small_sd, expected_targets(small_sd, mapping), mapping)
    params = {path_to_str(p): a for p, a in flat.items()}
    params["decoder.norm_out.scale"] = np.ones(16, np.float32)
    with pytest.raises(ConversionError) as ei:
        export_tensors(params, mapping)
    assert _problems(ei) == [
        f"<model>: parameter 'decoder.norm_out.scale': matches no rule of mapping {mapping.path}"
    ]


# ----------------------------------------------------------------------------------------
# broken YAML rules
# ----------------------------------------------------------------------------------------

_GOOD_RULE = """\
version: 1
rules:
  - name: conv_weight
    source: "{scope}.conv.weight"
    target: "{scope}.conv.kernel"
    transform: conv3d_oithw_to_thwio
    where:
      scope: 'encoder(?:\\.[a-z0-9_]+)*'
"""


def _load_text(tmp_path, text):
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    return load_mapping(f), str(f)


def _load_error(tmp_path, text) -> tuple[list[str], str]:
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(MappingError) as ei:
        load_mapping(f)
    return ei.value.problems, str(f)


def test_good_rule_loads(tmp_path):
    m, f = _load_text(tmp_path, _GOOD_RULE)
    assert m.path == f
    assert m.forward_key("encoder.a.conv.weight")[0] == "encoder.a.conv.kernel"


def test_yaml_unknown_transform(tmp_path):
    probs, f = _load_error(tmp_path, _GOOD_RULE.replace("conv3d_oithw_to_thwio", "transpose_all"))
    assert probs == [
        f"{f}: rule #0 'conv_weight': unknown transform 'transpose_all' (known: "
        + ", ".join(sorted(TRANSFORMS)) + ")"
    ]


def test_yaml_placeholder_not_in_where(tmp_path):
    text = _GOOD_RULE.replace('"{scope}.conv.weight"', '"{scope}.{name}.weight"').replace(
        '"{scope}.conv.kernel"', '"{scope}.{name}.kernel"')
    probs, f = _load_error(tmp_path, text)
    assert probs == [
        f"{f}: rule #0 'conv_weight': source template '{{scope}}.{{name}}.weight': "
        "placeholder {name} is not defined in 'where'",
        f"{f}: rule #0 'conv_weight': target template '{{scope}}.{{name}}.kernel': "
        "placeholder {name} is not defined in 'where'",
    ]


def test_yaml_bad_regex(tmp_path):
    probs, f = _load_error(tmp_path, _GOOD_RULE.replace("[a-z0-9_]+", "[a-z0-9_+"))
    assert len(probs) == 1
    assert probs[0].startswith(
        f"{f}: rule #0 'conv_weight': where: regex for {{scope}} does not compile: "
        "'encoder(?:\\\\.[a-z0-9_+)*': unterminated character set at position 12"
    )


def test_yaml_unknown_field(tmp_path):
    probs, f = _load_error(tmp_path, _GOOD_RULE.replace("    transform:", "    dtype: f32\n    transform:"))
    assert probs == [
        f"{f}: rule #0 'conv_weight': unknown field 'dtype' (allowed: description, name, "
        "source, target, transform, where)"
    ]


def test_yaml_missing_field(tmp_path):
    probs, f = _load_error(tmp_path, _GOOD_RULE.replace('    target: "{scope}.conv.kernel"\n', ""))
    assert probs == [
        f"{f}: rule #0 'conv_weight': missing field 'target'",
    ]


@pytest.mark.parametrize(
    "template, why",
    [
        ("{scope.conv.weight", "unclosed '{' at position 0"),
        ("{scope}.{a-b}.weight", "bad placeholder name {a-b} at position 8"),
        ("{scope}.conv}.weight", "unmatched '}' at position 12"),
        ("{scope}.{scope}.weight", "placeholder(s) used more than once: scope"),
    ],
)
def test_yaml_bad_template(tmp_path, template, why):
    probs, f = _load_error(tmp_path, _GOOD_RULE.replace('"{scope}.conv.weight"', f'"{template}"'))
    assert probs == [f"{f}: rule #0 'conv_weight': bad source template {template!r}: {why}"]


def test_yaml_duplicate_rule_name_and_multiple_problems(tmp_path):
    second = _GOOD_RULE.split("rules:\n", 1)[1].replace("conv3d_oithw_to_thwio", "nope")
    probs, f = _load_error(tmp_path, _GOOD_RULE + second)
    assert probs == [
        f"{f}: rule #1 'conv_weight': duplicate rule name (first used by rule #0)",
        f"{f}: rule #1 'conv_weight': unknown transform 'nope' (known: "
        + ", ".join(sorted(TRANSFORMS)) + ")",
    ]


def test_yaml_error_message_lists_every_problem(tmp_path):
    text = _GOOD_RULE.replace("    transform: conv3d_oithw_to_thwio\n", "    colour: red\n")
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(MappingError, match=re.escape(
        f"2 problem(s) in mapping:\n  - {f}: rule #0 'conv_weight': unknown field 'colour'"
    )) as ei:
        load_mapping(f)
    assert str(ei.value).splitlines()[2] == f"  - {f}: rule #0 'conv_weight': missing field 'transform'"
