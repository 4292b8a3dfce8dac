"""Packed-engine kernels: bit layout, and every optimized kernel against its numpy reference
and against PyTorch (±1 float tensors, one-padding), bit-exact, at awkward sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import has_avx2 as _has_avx2
from hypothesis import given, settings
from hypothesis import strategies as st

from bcnn.engine import _kernels as K
from bcnn.engine import _reference as R
from bcnn.engine import get_num_threads, num_threads, set_num_threads

CHANNELS = [1, 63, 64, 65, 130]


def _sign(a: np.ndarray) -> np.ndarray:
    return np.where(a >= 0, 1.0, -1.0).astype(np.float32)


def _torch_conv(xs: np.ndarray, ws: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """±1 NCHW input, ±1 OIHW weights, one-padding -> NHWC float."""
    x = F.pad(torch.from_numpy(xs), (pad,) * 4, value=1.0)
    y = F.conv2d(x, torch.from_numpy(ws), stride=stride)
    return y.numpy().transpose(0, 2, 3, 1)


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[:: max(1, x.size // 7)] = 0.0  # exact zeros: sign(0) = +1
    return x


# ------------------------------------------------------------------------------ bit layout


def test_pack_layout_known_words() -> None:
    x = np.ones(65, np.float32)
    x[[0, 3, 63, 64]] = -1.0
    p = K.pack_sign(x)
    assert p.dtype == np.uint64 and p.shape == (2,)
    assert int(p[0]) == (1 | 8 | (1 << 63)) and int(p[1]) == 1  # bit i of word j = 64j + i
    # little-endian bytes: element 3 is bit 3 of byte 0, element 63 is bit 7 of byte 7
    by = p.astype("<u8").view(np.uint8)
    assert list(by[:8]) == [0b1001, 0, 0, 0, 0, 0, 0, 0x80]
    assert list(by[8:]) == [1, 0, 0, 0, 0, 0, 0, 0]  # tail bits (65..127) are 0
    assert np.array_equal(K.unpack_bits(p, 65), np.where(x < 0, -1, 1))


@pytest.mark.parametrize("c", CHANNELS)
def test_pack_tail_bits_zero_and_zero_is_plus(c: int) -> None:
    x = -np.ones((3, c), np.float32)
    p = K.pack_sign(x)
    assert p.shape == (3, K._words(c))
    n_full = c // 64
    assert np.all(p[:, :n_full] == np.uint64(2**64 - 1))
    if c % 64:
        assert np.all(p[:, -1] == np.uint64((1 << (c % 64)) - 1))
    assert np.all(K.pack_sign(np.zeros((2, c), np.float32)) == 0)  # sign(0) = +1
    assert np.all(K.pack_sign(np.full((2, c), -0.0, np.float32)) == 0)  # -0.0 >= 0


def test_pack_weights_layout_and_prepared_blocks() -> None:
    rng = np.random.default_rng(1)
    w = _rand(rng, 70, 65, 3, 3)
    wp = K.pack_weights(w)
    assert wp.shape == (70, 3, 3, 2)
    assert np.array_equal(wp, R.pack_bits(np.transpose(w, (0, 2, 3, 1)) < 0))
    pw = K.prepare_conv_weights(wp, 65, path="generic")  # words (the lut nibbles: below)
    assert pw.blocks.shape == (3, 18, 32)
    flat = wp.reshape(70, 18)
    for o in range(96):
        want = flat[o] if o < 70 else np.zeros(18, np.uint64)
        assert np.array_equal(pw.blocks[o // 32, :, o % 32], want)


# ---------------------------------------------------------------------------------- packing


@settings(max_examples=25, deadline=None)
@given(
    c=st.sampled_from(CHANNELS),
    rows=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    with_bias=st.booleans(),
)
def test_pack_sign_matches_reference(c: int, rows: int, seed: int, with_bias: bool) -> None:
    rng = np.random.default_rng(seed)
    x = _rand(rng, rows, c)
    b = _rand(rng, c) if with_bias else None
    got = K.pack_sign(x, b)
    assert np.array_equal(got, R.pack_sign(x, b))
    # the bits are exactly sign(x + b) of torch in float32
    xt = torch.from_numpy(x) + (torch.from_numpy(b) if b is not None else 0.0)
    assert np.array_equal(K.unpack_bits(got, c), torch.where(xt >= 0, 1, -1).numpy())


@pytest.mark.parametrize("c", [1, 31, 32, 33, 63, 64, 65, 130])
@pytest.mark.parametrize("h,w", [(5, 3), (9, 9), (14, 14)])
def test_pack_sign_channels_first(c: int, h: int, w: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """NCHW input: 15 pixels (the scalar loop only), 81 (a 64-pixel block, a 16-pixel block
    and one more) and 196; channel counts around the vector kernels' 32-channel halves."""
    rng = np.random.default_rng(c)
    x, b = _rand(rng, 2, c, h, w), _rand(rng, c)
    got = K.pack_sign(x, b, channels_first=True)
    assert got.shape == (2, h, w, K._words(c))
    assert np.array_equal(got, K.pack_sign(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), b))
    assert np.array_equal(got, R.pack_sign(x, b, channels_first=True))
    # without a bias: the inline-checked common case, the same bits as the checked path
    xz = x.copy()
    xz.flat[::5] = -0.0  # sign(-0) = +1
    with monkeypatch.context() as m:  # the inline-checked case never reaches the checked path

        def not_here(*a: object) -> None:
            raise RuntimeError("took the checked path")

        m.setattr("bcnn.engine._kernels._packing._as_f32", not_here)
        fast = K.pack_sign(xz, channels_first=True)
        with pytest.raises(RuntimeError, match="checked path"):  # control: a bias is not it
            K.pack_sign(xz, np.zeros(c, np.float32), channels_first=True)
    assert np.array_equal(fast, K.pack_sign(xz, np.zeros(c, np.float32), channels_first=True))
    assert np.array_equal(fast, R.pack_sign(xz, None, channels_first=True))


def test_pack_threshold_semantics() -> None:
    # BN(x) = s*x + beta; sign(BN(x)) = +1 iff x >= t (s > 0) or x <= t (s < 0), t = -beta/s
    rng = np.random.default_rng(2)
    c = 67
    s = rng.standard_normal(c).astype(np.float32)
    s[:3] = 0.0  # constant channels
    beta = rng.standard_normal(c).astype(np.float32)
    beta[:2] = [1.0, -1.0]
    beta[2] = 0.0
    x = rng.standard_normal((9, c)).astype(np.float32)
    safe = s != 0
    t = np.zeros(c, np.float32)
    t[safe] = (-beta[safe] / s[safe]).astype(np.float32)
    x[0, safe] = t[safe]  # exactly at the threshold: +1 either way
    flip = s < 0
    # constant channels: +1 iff beta >= 0 -> thr -inf (always +1) or +inf (always -1)
    t[~safe] = np.where(beta[~safe] >= 0, -np.inf, np.inf)
    flip[~safe] = False
    got = K.pack_threshold(x, t, flip)
    assert np.array_equal(got, R.pack_threshold(x, t, flip))
    want = np.where(flip, x > t, x < t)
    assert np.array_equal(K.unpack_bits(got, c), np.where(want, -1, 1))
    assert np.all(K.unpack_bits(got, c)[0, safe] == 1)
    assert np.all(K.unpack_bits(got, c)[:, 0] == 1) and np.all(K.unpack_bits(got, c)[:, 1] == -1)
    # NaN compares false: +1
    nan = K.pack_threshold(np.full((1, 2), np.nan, np.float32), [0.0, 0.0], [False, True])
    assert int(nan[0, 0]) == 0


@settings(max_examples=20, deadline=None)
@given(c=st.sampled_from(CHANNELS), seed=st.integers(0, 2**31 - 1))
def test_pack_threshold_matches_reference(c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = _rand(rng, 4, c)
    thr = rng.choice(np.array([0.0, -0.5, 0.5, np.inf, -np.inf], np.float32), c)
    x[0] = thr  # ties
    flip = rng.random(c) < 0.5
    assert np.array_equal(K.pack_threshold(x, thr, flip), R.pack_threshold(x, thr, flip))


# ------------------------------------------------------------------------------- conv / gemm

# (cin, cout, size, kernel, stride, batch): every channel count with kernel 1 and 3 and
# stride 1 and 2; sizes and batches cycle through 1/5/14 and 1/7.
CONV_CASES = [
    (cin, cout, size, k, s, batch)
    for (i, (cin, k, s)) in enumerate(itertools.product(CHANNELS, [1, 3], [1, 2]))
    for cout, size, batch in [([1, 33, 64, 70, 130][i % 5], [1, 5, 14][i % 3], [1, 7][i % 2])]
]


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize("cin,cout,size,k,stride,batch", CONV_CASES)
def test_bconv2d_matches_torch_and_reference(
    cin: int, cout: int, size: int, k: int, stride: int, batch: int
) -> None:
    rng = np.random.default_rng(cin * 1000 + cout + size + k + stride)
    pad = k // 2
    x, w = _rand(rng, batch, cin, size, size), _rand(rng, cout, cin, k, k)
    xp = K.pack_sign(x, channels_first=True)
    wp = K.pack_weights(w)
    got = K.bconv2d(xp, K.prepare_conv_weights(wp, cin), stride, pad)
    assert got.dtype == np.int32
    assert np.array_equal(got, _torch_conv(_sign(x), _sign(w), stride, pad))
    assert np.array_equal(got, R.bconv2d(xp, wp, cin, stride, pad))


@pytest.mark.skipif(not _has_avx2(), reason="no AVX2")
@pytest.mark.parametrize("cin,cout,size,k,stride,batch", CONV_CASES)
def test_bconv2d_pairs_matches_two_planes(
    cin: int, cout: int, size: int, k: int, stride: int, batch: int
) -> None:
    """The lut path's plane pairs: one lookup per two activation planes gives conv(a0, W) +
    2 conv(a1, W), as torch and the reference compute them plane by plane."""
    rng = np.random.default_rng(cin * 1000 + cout + size + k + stride)
    pad = k // 2
    x, w = _rand(rng, 2 * batch, cin, size, size), _rand(rng, cout, cin, k, k)
    xp, wp = K.pack_sign(x, channels_first=True), K.pack_weights(w)
    got = K.bconv2d_pairs(K.pair_bytes(xp, batch), K.prepare_conv_weights(wp, cin, path="lut"),
                          stride, pad)  # fmt: skip
    t = _torch_conv(_sign(x), _sign(w), stride, pad)
    assert got.dtype == np.int32
    assert np.array_equal(got, t[:batch] + 2 * t[batch:])
    r = R.bconv2d(xp, wp, cin, stride, pad)
    assert np.array_equal(got, r[:batch] + 2 * r[batch:])


@pytest.mark.skipif(not _has_avx2(), reason="no AVX2")
@pytest.mark.parametrize("cin", [4 * 63 + 5, 1000])
def test_bconv2d_pairs_extremes_and_bad_input(cin: int) -> None:
    """Both planes opposite to every weight: each nibble sums 4 + 2*4 = 12, the pair path's
    byte accumulators at their largest (one word per run); a pair layout needs nibble weights
    and an even number of planes."""
    kw = K._words(cin)
    ones = np.full((1, 1, 1, kw), np.uint64(2**64 - 1))
    if cin % 64:
        ones[..., -1] &= np.uint64((1 << (cin % 64)) - 1)
    zero = np.zeros_like(ones)
    w = np.concatenate([zero, ones])  # (2, 1, 1, kw): an all-(+1) and an all-(-1) channel
    x = np.concatenate([ones, zero, ones, ones])  # images (a0, a1): (-1, -1) and (+1, -1)
    got = K.bconv2d_pairs(K.pair_bytes(x, 2), K.prepare_conv_weights(w, cin, path="lut"))
    want = np.array([[-3 * cin, 3 * cin], [-cin, cin]], np.int32)
    assert np.array_equal(got.reshape(2, 2), want)
    with pytest.raises(ValueError, match="nibble weights"):
        K.bconv2d_pairs(K.pair_bytes(x, 2), K.prepare_conv_weights(w, cin, path="generic"))
    with pytest.raises(ValueError, match="even number of uint64 planes"):
        K.pair_bytes(x[:3], 1)
    wider = K.prepare_conv_weights(np.zeros((2, 1, 1, kw + 1), np.uint64), 64 * kw + 64, path="lut")
    with pytest.raises(ValueError, match="words per pixel"):
        K.bconv2d_pairs(K.pair_bytes(x, 2), wider)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        K.bconv2d_pairs(K.pair_bytes(x, 2)[..., 1:], K.prepare_conv_weights(w, cin, path="lut"))


@pytest.mark.skipif(not _has_avx2(), reason="no AVX2")
@pytest.mark.parametrize("pairs", [False, True])
def test_lut_long_reductions_do_not_wrap(pairs: bool) -> None:
    """The lut tiles sum byte runs into uint16 and add those into int64 before they could
    wrap: a 1x1 conv over more bits than 65535 / (max per bit) with every bit opposite to the
    weight reaches sums past 2**16 (single planes: 1030 words; pairs, 3 per bit: 350 words).
    33 output channels: a full block of 32 (the vector epilogue, which adds the uint16 and
    int64 parts) and one more (the scalar one), in the int, affine and threshold modes."""
    kw = 350 if pairs else 1030
    cin = 64 * kw - 7  # a partial last word
    ones = np.full((1, 1, 1, kw), np.uint64(2**64 - 1))
    ones[..., -1] &= np.uint64((1 << (cin % 64)) - 1)
    zero = np.zeros_like(ones)
    cout = 33
    w = K.prepare_conv_weights(
        np.concatenate([ones if o % 3 else zero for o in range(cout)]), cin, path="lut"
    )
    sign = np.where(np.arange(cout) % 3, 1, -1)
    if pairs:
        got = K.bconv2d_pairs(K.pair_bytes(np.concatenate([ones, ones]), 1), w)
        want = 3 * cin * sign  # 3 * cin > 65535
        assert np.array_equal(got.reshape(cout), want)
        return
    want = cin * sign  # cin > 65535
    assert np.array_equal(K.bconv2d(ones, w).reshape(cout), want)
    scale = np.linspace(0.5, 2.0, cout).astype(np.float32)
    bias = np.linspace(-3.0, 3.0, cout).astype(np.float32)
    got_f = K.bconv2d_affine(ones, w, scale, bias)
    assert np.array_equal(got_f.reshape(cout), want.astype(np.float32) * scale + bias)
    thr = (want + np.where(np.arange(cout) % 2, 0.5, -0.5)).astype(np.float32)
    flip = np.arange(cout) % 4 == 0
    bits = K.unpack_bits(K.bconv2d_threshold(ones, w, thr, flip), cout).reshape(cout)
    assert np.array_equal(bits, np.where(np.where(flip, want > thr, want < thr), -1, 1))


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize("cin,k,stride,pad", [(65, 3, 1, 0), (130, 3, 2, 0), (1, 1, 2, 0)])
def test_bconv2d_without_padding(cin: int, k: int, stride: int, pad: int) -> None:
    rng = np.random.default_rng(3)
    x, w = _rand(rng, 2, cin, 7, 6), _rand(rng, 33, cin, k, k)
    got = K.bconv2d(
        K.pack_sign(x, channels_first=True),
        K.prepare_conv_weights(K.pack_weights(w), cin),
        stride,
        pad,
    )
    assert np.array_equal(got, _torch_conv(_sign(x), _sign(w), stride, pad))


def _affine_torch(acc: np.ndarray, scale, bias, rprelu=None, residual=None):  # type: ignore[no-untyped-def]
    y = torch.from_numpy(acc.astype(np.float32)) * torch.from_numpy(scale)
    y = y + torch.from_numpy(bias)
    if rprelu is not None:
        g, s, z = (torch.from_numpy(v) for v in rprelu)
        y = y - g
        y = torch.where(y >= 0, y, y * s)
        y = y + z
    if residual is not None:
        reps = acc.shape[-1] // residual.shape[-1]
        y = torch.from_numpy(residual).repeat(1, 1, 1, reps) + y
    return y.numpy()


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize("cout", [64, 70, 128])
@pytest.mark.parametrize("use_rp", [False, True])
@pytest.mark.parametrize("res_kind", [None, "same", "repeat", "inplace"])
def test_bconv2d_affine_epilogues(cout: int, use_rp: bool, res_kind: str | None) -> None:
    rng = np.random.default_rng(cout + use_rp)
    cin, n, size = 65, 7, 5
    x, w = _rand(rng, n, size, size, cin), _rand(rng, cout, cin, 3, 3)
    xp, wp = K.pack_sign(x), K.pack_weights(w)
    pw = K.prepare_conv_weights(wp, cin)
    scale, bias = _rand(rng, cout), _rand(rng, cout)
    scale[0] = 0.0
    scale[1] = -scale[1]
    rp = (_rand(rng, cout), _rand(rng, cout), _rand(rng, cout)) if use_rp else None
    res = None
    if res_kind is not None:
        cr = cout // 2 if res_kind == "repeat" else cout
        res = _rand(rng, n, size, size, cr)
    acc = R.bconv2d(xp, wp, cin, 1, 1)
    want_ref = R.bconv2d_affine(xp, wp, cin, scale, bias, 1, 1, rp, res)
    want_torch = _affine_torch(acc, scale, bias, rp, res)
    kw = {"padding": 1, "rprelu": rp, "residual": res}
    if res_kind == "inplace":
        assert res is not None
        stream = res.copy()
        got = K.bconv2d_affine(xp, pw, scale, bias, out=stream, **kw | {"residual": stream})
        assert got is stream
    else:
        got = K.bconv2d_affine(xp, pw, scale, bias, **kw)
    assert got.dtype == np.float32 and got.shape == (n, size, size, cout)
    assert np.array_equal(got, want_ref)
    assert np.array_equal(got, want_torch)


@pytest.mark.usefixtures("layout")
def test_plain_bconv2d_affine_runs_after_inline_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain call (packed x, float32 vectors, int stride and padding, one kernel thread)
    skips _run_conv's checked path and gives the same bits; any other argument goes through
    the checked path, which raises the one-line errors."""
    from bcnn.engine._kernels import _conv

    checked = _conv._run_conv

    def not_here(*a: object, **k: object) -> np.ndarray:
        raise RuntimeError("took the checked path")

    rng = np.random.default_rng(5)
    for cin, cout, n, size, stride, fma in [
        (1, 33, 1, 5, 1, False), (63, 64, 7, 5, 2, True), (65, 1, 1, 14, 1, False),
        (130, 65, 7, 1, 1, True),
    ]:  # fmt: skip
        x, w = _rand(rng, n, size, size, cin), _rand(rng, cout, cin, 3, 3)
        xp, wp = K.pack_sign(x), K.pack_weights(w)
        pw = K.prepare_conv_weights(wp, cin)
        scale, bias = _rand(rng, cout), _rand(rng, cout)
        mode = _conv._MODE_AFFINE_FMA if fma else _conv._MODE_AFFINE
        want = checked(xp, pw, stride, 1, mode, scale=scale, bias=bias)
        ref = R.bconv2d_affine(xp, wp, cin, scale, bias, stride, 1, fma=fma)
        with monkeypatch.context() as m:
            m.setattr(_conv, "_run_conv", not_here)
            got = K.bconv2d_affine(xp, pw, scale, bias, stride=stride, padding=1, fma=fma)
            assert np.array_equal(got, want) and np.array_equal(got, ref)
            for bad in (
                {"scale": scale[::-1][::-1].astype(np.float64)},  # converted by the checks
                {"bias": bias.tolist()},  # converted by the checks
                {"stride": np.int64(stride)},
                {"padding": 3},  # an error
                {"x": xp[..., :0]},  # an error
            ):
                kw = {"x": xp, "scale": scale, "bias": bias, "stride": stride, "padding": 1}
                kw |= bad
                with pytest.raises(RuntimeError, match="checked path"):
                    K.bconv2d_affine(kw.pop("x"), pw, kw.pop("scale"), kw.pop("bias"), **kw)
    with pytest.raises(ValueError, match="padding 3 must be smaller"):
        K.bconv2d_affine(xp, pw, scale, bias, padding=3)
    with pytest.raises(ValueError, match="words per pixel"):
        K.bconv2d_affine(xp[..., :0], pw, scale, bias, padding=1)


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize("cout", [64, 70])
@pytest.mark.parametrize("res_kind", [None, "same", "repeat"])
def test_affine_fma_is_torch_batch_norm(cout: int, res_kind: str | None) -> None:
    """fma=True: y = fma(acc, alpha, beta) with one rounding, which is how ATen's CPU batch norm
    computes eval mode; checked against the reference and against nn.BatchNorm2d itself."""
    rng = np.random.default_rng(cout)
    cin, n, size = 130, 2, 5
    x, w = _rand(rng, n, size, size, cin), _rand(rng, cout, cin, 3, 3)
    xp, wp = K.pack_sign(x), K.pack_weights(w)
    pw = K.prepare_conv_weights(wp, cin)
    bn = torch.nn.BatchNorm2d(cout).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(_rand(rng, cout)))
        bn.bias.copy_(torch.from_numpy(_rand(rng, cout)))
        bn.running_mean.copy_(torch.from_numpy(_rand(rng, cout)) * 10)
        bn.running_var.copy_(torch.from_numpy(np.abs(_rand(rng, cout)) + 0.1))
    try:
        from bcnn.engine._pack import _bn_alpha_beta
    except ImportError:  # the folding lives with the packer
        pytest.skip("bcnn.engine._pack._bn_alpha_beta not available")
    alpha, beta = _bn_alpha_beta(bn)
    rp = (_rand(rng, cout), _rand(rng, cout), _rand(rng, cout))
    res = (
        None
        if res_kind is None
        else _rand(rng, n, size, size, cout // (2 if res_kind == "repeat" else 1))
    )
    got = K.bconv2d_affine(xp, pw, alpha, beta, padding=1, rprelu=rp, residual=res, fma=True)
    assert np.array_equal(got, R.bconv2d_affine(xp, wp, cin, alpha, beta, 1, 1, rp, res, fma=True))
    acc = R.bconv2d(xp, wp, cin, 1, 1)
    with torch.no_grad():
        y = bn(torch.from_numpy(acc.astype(np.float32).transpose(0, 3, 1, 2)))
        y = y.permute(0, 2, 3, 1).contiguous()
        g, sl, z = (torch.from_numpy(v) for v in rp)
        y = y - g
        y = torch.where(y >= 0, y, y * sl) + z
        if res is not None:
            y = torch.from_numpy(res).repeat(1, 1, 1, cout // res.shape[-1]) + y
    assert np.array_equal(got, y.numpy())
    # the stem and the dense layer take the same option
    ps = K.prepare_stem_weights(K.pack_weights(_rand(rng, cout, 24, 3, 3)), 3, 8)
    img = rng.integers(0, 256, (1, 3, 6, 6), dtype=np.uint8)
    s = K.stem_conv(img, ps, 1, 1)
    st_got = K.stem_conv_affine(img, ps, alpha, beta, padding=1, fma=True)
    assert np.array_equal(st_got, R._affine(s, alpha, beta, fma=True))
    pd = K.prepare_dense_weights(K.pack_weights(_rand(rng, cout, cin)), cin)
    xd = K.pack_sign(_rand(rng, 3, cin))
    assert np.array_equal(
        K.blinear_affine(xd, pd, alpha, beta, fma=True),
        R._affine(K.blinear(xd, pd), alpha, beta, fma=True),
    )


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize(
    ("cin", "cout", "size", "stride", "n", "res_kind"),
    [
        (1, 1, 5, 1, 1, None),
        (63, 65, 7, 2, 7, "same"),
        (65, 64, 5, 1, 1, "repeat"),
        (130, 63, 9, 2, 2, None),
        (64, 96, 6, 1, 3, "same"),
    ],
)
def test_prescaled_fma_epilogue(
    cin: int, cout: int, size: int, stride: int, n: int, res_kind: str | None
) -> None:
    """prescale: y = fma(float32(acc) * pre[o], alpha[o], beta[o]) with the product rounded
    first (a k-bit layer's 1-bit view: its weight scale, then its batch norm), full tiles
    (from registers) and partial ones alike, public and bound entry points."""
    rng = np.random.default_rng(cin * cout + size)
    x, w = _rand(rng, n, size, size, cin), _rand(rng, cout, cin, 3, 3)
    xp, wp = K.pack_sign(x), K.pack_weights(w)
    pw = K.prepare_conv_weights(wp, cin)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    pre = (np.abs(f32(cout)) * 1e-2 + 1e-3).astype(np.float32)
    alpha, beta = f32(cout), f32(cout)
    rp = (f32(cout), f32(cout), f32(cout))
    ho = (size + 2 - 3) // stride + 1
    cr = cout // 2 if res_kind == "repeat" else cout
    res = None if res_kind is None else _rand(rng, n, ho, ho, cr)
    acc = R.bconv2d(xp, wp, cin, stride, 1)
    want = R._affine(acc.astype(np.float32) * pre, alpha, beta, rp, fma=True)
    if res is not None:
        want = np.tile(res, (1, 1, 1, cout // cr)) + want
    kw = {"stride": stride, "padding": 1, "rprelu": rp, "residual": res, "fma": True}
    got = K.bconv2d_affine(xp, pw, alpha, beta, prescale=pre, **kw)
    assert np.array_equal(got, want)
    if cout > 32:  # not the same as folding the scale into alpha: the rounding is seen
        folded = K.bconv2d_affine(xp, pw, alpha * pre, beta, **kw)
        assert not np.array_equal(folded, want)
    run = K.bind_conv_affine(
        xp.shape, pw, alpha, beta, stride=stride, padding=1, rprelu=rp,
        residual_channels=None if res is None else cr, fma=True, prescale=pre,
    )  # fmt: skip
    out = np.empty_like(want)
    assert np.array_equal(run(xp, res, out), want)
    x2 = rng.integers(0, 2**63, xp.shape, dtype=np.uint64)  # the padded workspace is reused
    want2 = K.bconv2d_affine(x2, pw, alpha, beta, prescale=pre, **kw)
    assert np.array_equal(run(x2, res, out), want2) and not np.array_equal(want2, want)
    with pytest.raises(ValueError, match="prescale needs fma=True"):
        K.bconv2d_affine(xp, pw, alpha, beta, prescale=pre)
    with pytest.raises(ValueError, match="prescale must have shape"):
        K.bconv2d_affine(xp, pw, alpha, beta, prescale=pre[:-1], fma=True)


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize(("cout", "stride", "n"), [(1, 1, 1), (64, 2, 7), (65, 1, 2)])
def test_prescaled_fma_stem(cout: int, stride: int, n: int) -> None:
    """The stem's prescaled epilogue (a k-bit stem's top plane): fast path and general path,
    public and bound entry points, against the reference."""
    rng = np.random.default_rng(cout + stride)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    pre = (np.abs(f32(cout)) * 1e-2 + 1e-3).astype(np.float32)
    alpha, beta = f32(cout), f32(cout)
    rp = (f32(cout), f32(cout), f32(cout))
    img = rng.integers(0, 256, (n, 3, 9, 9), dtype=np.uint8)
    for planes in (8, 24):  # 3 x 8 planes: one-word patches (fast path); 3 x 24 bits: general
        c = 3 * planes // 8
        ps = K.prepare_stem_weights(K.pack_weights(_rand(rng, cout, 8 * c, 3, 3)), c, 8)
        x = img if c == 3 else np.concatenate([img] * (c // 3), axis=1)
        s = K.stem_conv(x, ps, stride, 1)
        want = R._affine(s.astype(np.float32) * pre, alpha, beta, rp, fma=True)
        got = K.stem_conv_affine(x, ps, alpha, beta, stride=stride, padding=1, rprelu=rp,
                                 fma=True, prescale=pre)  # fmt: skip
        assert np.array_equal(got, want)
        run = K.bind_stem_affine(x.shape, ps, alpha, beta, stride=stride, padding=1, rprelu=rp,
                                 fma=True, prescale=pre)  # fmt: skip
        assert np.array_equal(run(x, np.empty_like(want)), want)
    with pytest.raises(ValueError, match="prescale needs fma=True"):
        K.stem_conv_affine(x, ps, alpha, beta, prescale=pre)


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize("cout", [1, 64, 65, 130])
def test_bconv2d_threshold(cout: int) -> None:
    rng = np.random.default_rng(cout)
    cin = 63
    x, w = _rand(rng, 2, 5, 5, cin), _rand(rng, cout, cin, 3, 3)
    xp, wp = K.pack_sign(x), K.pack_weights(w)
    acc = R.bconv2d(xp, wp, cin, 2, 1)
    thr = acc[0, 0, 0].astype(np.float32)  # ties at the first pixel
    thr[::3] += 0.5
    flip = rng.random(cout) < 0.5
    got = K.bconv2d_threshold(xp, K.prepare_conv_weights(wp, cin), thr, flip, stride=2, padding=1)
    assert got.shape == (2, 3, 3, K._words(cout))
    assert np.array_equal(got, R.bconv2d_threshold(xp, wp, cin, thr, flip, 2, 1))
    want = np.where(flip, acc > thr, acc < thr)
    assert np.array_equal(K.unpack_bits(got, cout), np.where(want, -1, 1))


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize("k", [*CHANNELS, 2304])
@pytest.mark.parametrize("n,o", [(1, 10), (7, 64), (5, 130)])
def test_blinear_and_bgemm(k: int, n: int, o: int) -> None:
    rng = np.random.default_rng(k + n + o)
    x, w = _rand(rng, n, k), _rand(rng, o, k)
    xp, wp = K.pack_sign(x), K.pack_weights(w)
    pw = K.prepare_dense_weights(wp, k)
    want = F.linear(torch.from_numpy(_sign(x)), torch.from_numpy(_sign(w))).numpy()
    got = K.blinear(xp, pw)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert np.array_equal(got, R.blinear(xp, wp, k))
    assert np.array_equal(K.bgemm(xp, wp, k), want)
    assert np.array_equal(K.bgemm(xp, pw), want)
    scale, bias = _rand(rng, o), _rand(rng, o)
    aff = K.blinear_affine(xp, pw, scale, bias)
    assert np.array_equal(aff, R.blinear_affine(xp, wp, k, scale, bias))
    assert np.array_equal(aff, _affine_torch(want, scale, bias))


@pytest.mark.parametrize("o,cin,k", [(70, 65, 3), (256, 256, 3), (64, 64, 3), (10, 130, 1)])
def test_prepared_weights_are_cache_line_aligned(layout: str, o: int, cin: int, k: int) -> None:
    """Every prepared block starts at a multiple of 64 bytes, so no 32- or 64-byte vector load
    of it straddles two cache lines (numpy alone aligns these arrays to 16 bytes: 16, 32 or
    48 mod 64 for most of these shapes); the stem's words and nibbles too."""
    rng = np.random.default_rng(o + cin)
    for _ in range(3):  # several allocations: not one lucky address
        pw = K.prepare_conv_weights(K.pack_weights(_rand(rng, o, cin, k, k)), cin)
        assert pw.blocks.ctypes.data % 64 == 0 and pw.blocks.flags.c_contiguous
        dw = K.prepare_dense_weights(K.pack_weights(_rand(rng, o, cin)), cin)
        assert dw.blocks.ctypes.data % 64 == 0
    stem = K.prepare_stem_weights(K.pack_weights(_rand(rng, 64, 24, 3, 3)), 3, 8)
    assert stem.blocks.ctypes.data % 64 == 0
    if stem.nibbles is not None and stem.nibbles.size:
        assert stem.nibbles.ctypes.data % 64 == 0


def test_prepared_layout_of_each_path(layout: str) -> None:
    """The lut path's weights are the words' nibbles (bits 4q..4q+3 of word k at row 16k + q);
    the kernels read whichever layout they are given; a bad path or layout is refused."""
    rng = np.random.default_rng(5)
    w = K.pack_weights(_rand(rng, 70, 65, 3, 3))
    pw = K.prepare_conv_weights(w, 65)
    words = K.prepare_conv_weights(w, 65, path="generic").blocks  # (3, 18, 32) uint64
    if layout == "lut":
        assert pw.blocks.dtype == np.uint8 and pw.blocks.shape == (3, 16 * 18, 32)
        for q in (0, 5, 15):
            want = (words >> np.uint64(4 * q)) & np.uint64(15)
            assert np.array_equal(pw.blocks[:, q::16, :], want.astype(np.uint8))
    else:
        assert pw.blocks.dtype == np.uint64 and np.array_equal(pw.blocks, words)
    with pytest.raises(ValueError, match="unknown kernel path 'avx9'"):
        K.prepare_dense_weights(w.reshape(70, -1), 9 * 128, path="avx9")
    bad = pw._replace(blocks=np.zeros((3, 18 * 3, 32), np.uint8))
    x = K.pack_sign(_rand(rng, 1, 5, 5, 65))
    with pytest.raises(ValueError, match="inconsistent PreparedWeights"):
        K.bconv2d(x, bad, 1, 1)


@pytest.mark.skipif(not _has_avx2(), reason="no AVX2")
def test_lut_path_layout_follows_the_min_words_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the lut path prepares nibbles for every layer (one layout per model); with
    a minimum reduction length, shorter reductions keep words; an explicit path="lut" always
    takes nibbles, path="generic" never."""
    monkeypatch.setenv("BCNN_KERNEL_PATH", "lut")
    one_word = np.zeros((10, 1), np.uint64)
    nine = np.zeros((8, 3, 3, 1), np.uint64)
    assert K.prepare_dense_weights(one_word, 64).blocks.dtype == np.uint8
    assert K.prepare_dense_weights(one_word, 64, path="generic").blocks.dtype == np.uint64
    monkeypatch.setattr("bcnn.engine._kernels._weights._LUT_MIN_WORDS", 8)
    assert K.prepare_dense_weights(one_word, 64).blocks.dtype == np.uint64
    assert K.prepare_dense_weights(one_word, 64, path="lut").blocks.dtype == np.uint8
    assert K.prepare_conv_weights(nine, 64).blocks.dtype == np.uint8


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize("k", [4 * 63 * 3 + 5, 2305])
def test_bgemm_extremes(k: int) -> None:
    """All-equal and all-opposite rows: every nibble counts 4 (the lut path's byte
    accumulators at their largest, widened between runs of words), tails masked."""
    kw = (k + 63) // 64
    zero = np.zeros((1, kw), np.uint64)
    ones = np.full((1, kw), np.uint64(2**64 - 1))
    ones[:, -1] &= np.uint64((1 << (k % 64)) - 1)
    rows = np.concatenate([zero, ones])
    want = np.array([[k, -k], [-k, k]], np.int32)
    assert np.array_equal(K.bgemm(rows, rows, k), want)
    wide = np.repeat(rows, 70, axis=0)  # several channel blocks, a partial one, 70 pixels
    got = K.bgemm(wide, wide, k)
    assert np.array_equal(got, np.kron(want, np.ones((70, 70), np.int32)))


@pytest.mark.usefixtures("layout")
def test_bgemm_full_words_random_bits() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 2**64, (37, 9), dtype=np.uint64)
    b = rng.integers(0, 2**64, (45, 9), dtype=np.uint64)
    assert np.array_equal(K.bgemm(a, b), R.bgemm(a, b))


# ------------------------------------------------------------------------------- first layer


@pytest.mark.usefixtures("layout")
@pytest.mark.parametrize(
    "encoding,planes,c,size,stride,batch",
    [
        ("bitplane", 8, 3, 14, 1, 1),
        ("bitplane", 8, 1, 5, 2, 7),
        ("bitplane", 4, 3, 5, 1, 2),
        ("thermometer", 16, 3, 14, 2, 1),
        ("thermometer", 7, 1, 5, 1, 7),
    ],
)
def test_stem_conv_matches_encoded_conv(
    encoding: str, planes: int, c: int, size: int, stride: int, batch: int
) -> None:
    from bcnn.nn import BitPlaneEncoder, EncodedConv2d, ThermometerEncoder

    enc = (
        BitPlaneEncoder(c, bits=planes)
        if encoding == "bitplane"
        else ThermometerEncoder(c, levels=planes)
    )
    m = EncodedConv2d(c, 70, 3, stride=stride, padding=1, encoder=enc)
    x = torch.randint(0, 256, (batch, c, size, size), dtype=torch.uint8)
    x[0, 0, 0, :] = 255
    x[-1, -1, -1, :] = 0
    with torch.no_grad():
        want = m(x).numpy().transpose(0, 2, 3, 1)
    thr = enc.thresholds.numpy() if isinstance(enc, ThermometerEncoder) else None
    wp = K.pack_weights(m.weight.detach().numpy())
    ps = K.prepare_stem_weights(wp, c, planes, encoding, thr)
    s = K.stem_conv(x.numpy(), ps, stride, 1)
    assert s.dtype == np.int32
    assert np.array_equal(s, R.stem_conv(x.numpy(), wp, planes, encoding, thr, stride, 1))
    step = float(enc.plane_weights[0]) if encoding == "thermometer" else 1.0
    if encoding == "bitplane":
        assert np.array_equal(s.astype(np.float32), want)  # exact integers
    else:
        np.testing.assert_allclose(s * step, want, rtol=1e-5, atol=1e-3)
    rng = np.random.default_rng(0)
    scale, bias = _rand(rng, 70), _rand(rng, 70)
    rp = (_rand(rng, 70), _rand(rng, 70), _rand(rng, 70))
    aff = K.stem_conv_affine(x.numpy(), ps, scale, bias, stride=stride, padding=1, rprelu=rp)
    assert np.array_equal(aff, _affine_torch(s, scale, bias, rp))


@pytest.mark.skipif(not _has_avx2(), reason="no AVX2")
@pytest.mark.parametrize(
    "cout,size,stride,batch,planes,c",
    [(1, 5, 1, 7, 8, 3), (63, 14, 2, 1, 8, 3), (65, 5, 1, 1, 4, 3), (64, 9, 2, 7, 8, 1),
     (130, 1, 1, 1, 8, 3), (33, 7, 1, 2, 2, 7)],
)  # fmt: skip
def test_lut_stem_matches_popcount_stem(
    cout: int, size: int, stride: int, batch: int, planes: int, c: int
) -> None:
    """The lut path's fast stem (nibble weights, one lookup per 4 bits of 32 channels) ==
    the popcount stem == the reference, one thread, int and float epilogues, full and
    partial tiles (1, 63, 65, 130 channels; odd sizes; stride 2; batch 1 and 7; 7 channels x 9
    taps = 63 bits: all 16 nibbles)."""
    rng = np.random.default_rng(cout * 100 + size + c)
    wp = K.pack_weights(_rand(rng, cout, c * planes, 3, 3))
    x = rng.integers(0, 256, (batch, c, size, size), dtype=np.uint8)
    x[0, 0, 0] = 255
    lut = K.prepare_stem_weights(wp, c, planes, path="lut")
    pop = K.prepare_stem_weights(wp, c, planes, path="generic")
    assert lut.nibbles.size and not pop.nibbles.size  # the fast stem has nibbles on lut only
    scale, bias = _rand(rng, cout), _rand(rng, cout)
    rp = (_rand(rng, cout), _rand(rng, cout), _rand(rng, cout))
    with num_threads(1):
        want = R.stem_conv(x, wp, planes, "bitplane", None, stride, 1)
        assert np.array_equal(K.stem_conv(x, lut, stride, 1), want)
        assert np.array_equal(K.stem_conv(x, pop, stride, 1), want)
        for r in (None, rp):
            a = K.stem_conv_affine(x, lut, scale, bias, stride=stride, padding=1, rprelu=r)
            b = K.stem_conv_affine(x, pop, scale, bias, stride=stride, padding=1, rprelu=r)
            assert np.array_equal(a, b)
            assert np.array_equal(a, _affine_torch(want, scale, bias, r))
    bad = lut._replace(nibbles=lut.nibbles[:, 1:])  # edited: rejected before any kernel
    with pytest.raises(ValueError, match="inconsistent PreparedStem"):
        K.stem_conv(x, bad, stride, 1)


# ----------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("c", [1, 65])
@pytest.mark.parametrize("k,stride,pad", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_maxpool_packed(c: int, k: int, stride: int, pad: int) -> None:
    rng = np.random.default_rng(c + k)
    x = _rand(rng, 2, 7, 6, c)
    xp = K.pack_sign(x)
    got = K.maxpool_packed(xp, k, stride, pad)
    assert np.array_equal(got, R.maxpool_packed(xp, k, stride, pad))
    t = F.max_pool2d(torch.from_numpy(_sign(x).transpose(0, 3, 1, 2)), k, stride, pad)
    assert np.array_equal(K.unpack_bits(got, c), t.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("h,w", [(1, 1), (5, 5), (14, 14), (7, 4)])
def test_avgpool2x2_and_global(h: int, w: int) -> None:
    rng = np.random.default_rng(h * w)
    x = _rand(rng, 7, h, w, 65)
    got = K.avgpool2x2(x)
    assert np.array_equal(got, R.avgpool2x2(x))
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    t = pool(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, t, rtol=1e-6, atol=1e-7)
    g = K.global_avgpool(x)
    np.testing.assert_allclose(g, torch.from_numpy(x).mean(dim=(1, 2)).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------- threads


@pytest.mark.usefixtures("layout")
def test_num_threads_context_and_parallel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    prev = get_num_threads()
    with num_threads(1) as n:
        assert n == 1 and get_num_threads() == 1
    assert get_num_threads() == prev
    with pytest.raises(ValueError):
        set_num_threads(0)
    rng = np.random.default_rng(7)
    monkeypatch.setattr(K._conv, "_PARALLEL_MIN_WORK", 0)  # read by the conv driver
    # many pixels (chunks of macro tiles), few pixels (output blocks split between threads)
    for n, size in ((3, 9), (1, 5)):
        x, w = _rand(rng, n, size, size, 130), _rand(rng, 70, 130, 3, 3)
        xp, pw = K.pack_sign(x), K.prepare_conv_weights(K.pack_weights(w), 130)
        scale, bias = _rand(rng, 70), _rand(rng, 70)
        thr, flip = _rand(rng, 70), rng.random(70) < 0.5
        with num_threads(1):
            serial = K.bconv2d_affine(xp, pw, scale, bias, padding=1)
            serial_b = K.bconv2d_threshold(xp, pw, thr, flip, padding=1)
        with num_threads(2):
            par = K.bconv2d_affine(xp, pw, scale, bias, padding=1)
            par_b = K.bconv2d_threshold(xp, pw, thr, flip, padding=1)
        assert np.array_equal(serial, par) and np.array_equal(serial_b, par_b)
        assert np.array_equal(
            serial, R.bconv2d_affine(xp, K.pack_weights(w), 130, scale, bias, 1, 1)
        )


# -------------------------------------------------------------------------------- validation


def test_wrappers_validate_before_kernels() -> None:
    pw = K.prepare_conv_weights(K.pack_weights(np.ones((4, 65, 3, 3), np.float32)), 65)
    good = np.zeros((1, 5, 5, 2), np.uint64)
    with pytest.raises(ValueError, match="uint64"):
        K.bconv2d(good.astype(np.int64), pw)
    with pytest.raises(ValueError, match="words"):
        K.bconv2d(np.zeros((1, 5, 5, 1), np.uint64), pw)
    with pytest.raises(ValueError, match="dimensions"):
        K.bconv2d(np.zeros((5, 5, 2), np.uint64), pw)
    with pytest.raises(ValueError, match="no output"):
        K.bconv2d(np.zeros((1, 1, 1, 2), np.uint64), pw)
    with pytest.raises(ValueError, match="stride"):
        K.bconv2d(good, pw, stride=0)
    with pytest.raises(ValueError, match="shape"):
        K.bconv2d_affine(good, pw, np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="residual"):
        K.bconv2d_affine(good, pw, np.ones(4), np.ones(4), residual=np.zeros((1, 3, 3, 3)))
    with pytest.raises(ValueError, match="PreparedWeights"):
        K.bconv2d(good, np.zeros((4, 3, 3, 2), np.uint64))  # type: ignore[arg-type]
    bad_tail = np.zeros((4, 3, 3, 2), np.uint64)
    bad_tail[0, 0, 0, 1] = np.uint64(1 << 5)  # bit 69 > 65 channels
    with pytest.raises(ValueError, match="tail"):
        K.prepare_conv_weights(bad_tail, 65)
    with pytest.raises(ValueError, match="words"):
        K.prepare_dense_weights(np.zeros((3, 2), np.uint64), 10)
    with pytest.raises(ValueError, match="uint8"):
        ps = K.prepare_stem_weights(np.zeros((4, 3, 3, 1), np.uint64), 3, 8)
        K.stem_conv(np.zeros((1, 3, 5, 5), np.float32), ps)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float"):
        K.pack_sign(np.zeros((2, 3), bool))


# ------------------------------------------------------------------------------------ bench


@pytest.mark.parametrize("layer", ["conv3x3", "conv1x1", "linear"])
def test_bench_layer_cli_json(layer: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import warnings

    from bcnn.cli import main

    args = ["bench", "--layer", layer, "--channels", "65", "--size", "5", "--repeat", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--json", "--out-channels", "70"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("binary_ms", "float_ms", "int8_ms", "speedup_vs_float", "speedup_vs_int8"):
        assert res[key] > 0
    assert res["binary_exact"] is True and res["layer"] == layer
    assert "thread_scaling" not in res  # one thread: nothing to scale against
    if layer == "conv3x3":  # more threads: one thread's time of the same call, same run
        assert main([*args, "--json", "--threads", "2", "--batch", "3"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["threads"] == 2 and res["binary_1_thread_ms"] > 0
        assert res["thread_scaling"] == res["binary_1_thread_ms"] / res["binary_ms"]
    assert main(["bench"]) == 2  # neither MODEL nor --layer
    assert main(["bench", "bcnn_cifar", "--layer", "conv3x3"]) == 2
