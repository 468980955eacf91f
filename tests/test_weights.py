"""The numpy weight builders (``lowering/weights.py``) against a direct convolution.

``direct_conv`` below is the definition of ONNX Conv written as explicit loops over output
positions: slow, obvious, and independent of every vectorised path. The builders are checked
by multiplying their matrix with patches cut in numpy in the order the emitted graph uses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnx_convfc.lowering.weights import flat_weight, patch_weight

# rank, channels, out channels, group, kernel, strides, dilations, pads (begins + ends)
CASES = [
    (1, 3, 4, 1, (3,), (1,), (1,), (1, 0)),
    (1, 4, 6, 2, (2,), (2,), (3,), (0, 2)),
    (2, 3, 5, 1, (3, 2), (2, 1), (1, 2), (1, 0, 2, 1)),
    (2, 4, 4, 4, (3, 3), (1, 2), (2, 1), (0, 1, 1, 0)),  # depthwise
    (2, 3, 6, 3, (2, 3), (1, 1), (1, 1), (0, 0, 0, 0)),  # depthwise, channel multiplier 2
    (2, 6, 9, 3, (1, 1), (2, 2), (1, 1), (1, 1, 0, 0)),  # grouped pointwise
    (3, 2, 3, 1, (2, 3, 2), (1, 2, 1), (2, 1, 1), (1, 0, 0, 0, 1, 1)),
    (3, 4, 2, 2, (1, 2, 2), (2, 1, 1), (1, 1, 2), (0, 0, 1, 1, 0, 0)),
]
IDS = [f"{r}d-c{c}m{m}g{g}-k{'x'.join(map(str, k))}" for r, c, m, g, k, *_ in CASES]


def direct_conv(x, w, b, strides, dilations, pads, group):
    """ONNX Conv by its definition: one dot product per (output position, output channel)."""
    r = w.ndim - 2
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    m, c_g = w.shape[:2]
    kernel = w.shape[2:]
    out = [(x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(r)]
    y = np.zeros((x.shape[0], m, *out))
    for pos in itertools.product(*(range(o) for o in out)):
        window = tuple(slice(p * s, p * s + (k - 1) * d + 1, d)
                       for p, s, k, d in zip(pos, strides, kernel, dilations))
        for oc in range(m):
            g = oc // (m // group)
            patch = x[(slice(None), slice(g * c_g, (g + 1) * c_g)) + window]
            y[(slice(None), oc) + pos] = (patch * w[oc]).reshape(x.shape[0], -1).sum(axis=1)
    if b is not None:
        y += b.reshape(1, m, *[1] * r)
    return y


def channels_last_patches(x, kernel, strides, dilations, pads, group):
    """``[N, g, out..., taps * C/g]``: per group, one ``[..., C/g]`` slice per kernel offset."""
    r = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)])
    n, c = x.shape[:2]
    xg = np.moveaxis(x.reshape(n, group, c // group, *x.shape[2:]), 2, -1)
    out = [(x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(r)]
    pieces = [xg[(slice(None), slice(None))
                 + tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                         for o, d, s, size in zip(offset, dilations, strides, out))]
              for offset in itertools.product(*(range(k) for k in kernel))]
    return np.concatenate(pieces, axis=-1)


def make(rng, c, m, group, kernel, dtype=np.float32):
    w = rng.standard_normal((m, c // group, *kernel)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype)
    return w, b


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_conv_matches_direct_definition(case, reference_conv):
    """The vectorised reference the grid and fuzz tests use is the definition too."""
    r, c, m, g, kernel, strides, dilations, pads = case
    rng = np.random.default_rng(1)
    w, b = make(rng, c, m, g, kernel)
    x = rng.standard_normal((2, c, *[7 - i for i in range(r)])).astype(np.float32)
    want = direct_conv(x, w, b, strides, dilations, pads, g)
    np.testing.assert_allclose(reference_conv(x, w, b, strides, dilations, pads, g), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_patch_weight_times_patches_is_the_conv(case):
    r, c, m, g, kernel, strides, dilations, pads = case
    rng = np.random.default_rng(2)
    w, b = make(rng, c, m, g, kernel)
    x = rng.standard_normal((2, c, *[6 + i for i in range(r)])).astype(np.float32)
    matrix = patch_weight(w, g)
    taps = int(np.prod(kernel))
    if g == 1:
        assert matrix.shape == (taps * c, m)
    else:
        assert matrix.shape == (g, taps * c // g, m // g)
    patches = channels_last_patches(x.astype(np.float64), kernel, strides, dilations, pads, g)
    # [N, g, out..., K] @ [g, K, Mg] per group -> [N, g, out..., Mg] -> [N, M, out...]
    grouped = matrix.reshape(g, taps * c // g, m // g).astype(np.float64)
    y = np.einsum("ng...k,gkm->ngm...", patches, grouped)
    y = y.reshape(x.shape[0], m, *y.shape[3:]) + b.reshape(1, m, *[1] * r)
    np.testing.assert_allclose(y, direct_conv(x, w, b, strides, dilations, pads, g),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [cs for cs in CASES if cs[3] == 1],
                         ids=[i for i, cs in zip(IDS, CASES) if cs[3] == 1])
def test_flat_weight_is_the_conv_as_a_linear_layer(case):
    """Input exactly as large as the dilated kernel: ``flatten(taps of x) @ W + b``."""
    r, c, m, _, kernel, _, dilations, _ = case
    rng = np.random.default_rng(3)
    w, b = make(rng, c, m, 1, kernel)
    x = rng.standard_normal((3, c, *[(k - 1) * d + 1 for k, d in zip(kernel, dilations)]))
    want = direct_conv(x, w, b, (1,) * r, dilations, (0,) * (2 * r), 1)
    assert want.shape == (3, m) + (1,) * r
    taps = x[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilations)]
    matrix = flat_weight(w)
    assert matrix.shape == (c * int(np.prod(kernel)), m)
    np.testing.assert_allclose(taps.reshape(3, -1) @ matrix + b, want.reshape(3, m),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_builders_keep_dtype_and_return_contiguous_arrays(dtype):
    rng = np.random.default_rng(4)
    w, _ = make(rng, 6, 9, 3, (3, 2), dtype)
    for matrix in (patch_weight(w, 3), patch_weight(w[:, :2].copy(), 1),
                   flat_weight(w)):
        assert matrix.dtype == dtype
        assert matrix.flags.c_contiguous


def test_builders_do_not_modify_or_alias_the_weight():
    rng = np.random.default_rng(5)
    w, _ = make(rng, 4, 4, 2, (3, 3))
    before = w.copy()
    for matrix in (patch_weight(w, 2), patch_weight(w, 1), flat_weight(w)):
        assert not np.shares_memory(matrix, w)
        matrix[...] = 0
    np.testing.assert_array_equal(w, before)


def test_fp16_builders_are_exact_permutations():
    """Lowering only moves weight elements: no rounding, same multiset of values."""
    rng = np.random.default_rng(6)
    w, _ = make(rng, 4, 8, 2, (3, 3), np.float16)
    for matrix in (patch_weight(w, 2), flat_weight(w)):
        np.testing.assert_array_equal(np.sort(matrix, axis=None), np.sort(w, axis=None))
