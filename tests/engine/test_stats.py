import math

import pytest
import torch

from nanprobe.engine import stats as st


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_and_device_rows_agree(dtype):
    tiny = torch.finfo(dtype).smallest_normal
    x = torch.tensor([0.0, 0.0, tiny / 4, -3.0, 2.0, math.inf, -math.inf, math.nan], dtype=dtype)
    host = st.host_row(x)
    dev = st.device_row(x).tolist()
    assert host == pytest.approx(dev, nan_ok=True)
    assert host[st.NUMEL] == 8 and host[st.ZEROS] == 2 and host[st.SUBNORMAL] == 1
    assert host[st.POSINF] == 1 and host[st.NEGINF] == 1 and host[st.NAN] == 1
    assert host[st.MAX_ABS] == 3.0
    assert host[st.MIN_NONZERO] == pytest.approx(float(torch.tensor(tiny / 4, dtype=dtype)))


def test_fast_path_for_normal_finite_tensors():
    x = torch.tensor([1.5, -2.0, 0.25])
    assert st.host_row(x) == [3.0, 2.0, 0.25, 0, 0, 0, 0, 0]


def test_all_zero_tensor_has_no_min():
    row = st.host_row(torch.zeros(4, dtype=torch.float16))
    assert row[st.ZEROS] == 4 and math.isinf(row[st.MIN_NONZERO])
    assert st.TensorStats.of(row).min_nonzero is None


def test_merge_of_outputs():
    a, b = st.host_row(torch.tensor([1.0, 0.0])), st.host_row(torch.tensor([5.0, math.inf]))
    m = st.merge([a, b])
    assert m[st.NUMEL] == 4 and m[st.MAX_ABS] == 5.0 and m[st.ZEROS] == 1 and m[st.POSINF] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 1e-6, 1e-30, math.inf, -math.inf, math.nan])
def test_constant_row_matches_measured_row(dtype, value):
    x = torch.full((5,), value, dtype=dtype)
    held = x[0].item()  # the value as the dtype holds it (1e-30 is 0 in fp16)
    assert st.constant_row(held, 5, dtype) == pytest.approx(st.device_row(x).tolist(), nan_ok=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zeros_and_subnormals_counted_on_the_host(dtype):
    tiny = torch.finfo(dtype).smallest_normal
    x = torch.tensor([0.0, tiny / 8, tiny / 2, 1.0, -4.0], dtype=dtype)
    row = st.host_row(x)
    assert row[st.ZEROS] == 1 and row[st.SUBNORMAL] == 2 and row[st.MAX_ABS] == 4.0
    assert row[st.MIN_NONZERO] == pytest.approx(float(torch.tensor(tiny / 8, dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_rows_read_from_the_bits_agree_with_the_float_row(dtype):
    # The edges of the bit-pattern reading: -0.0 (sign bit only), the smallest normal itself (not
    # subnormal), the largest subnormal, the largest finite; with and without the reused buffer.
    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    x = torch.tensor([-0.0, 0.0, tiny, -tiny, tiny * (1 - info.eps), info.max, -1.5, 3.0], dtype=dtype)
    scratch = st.Scratch()
    want = st.device_row(x).tolist()
    assert st.host_row(x) == want == st.host_row(x, scratch)
    assert want[st.ZEROS] == 2 and want[st.SUBNORMAL] == 1 and want[st.MAX_ABS] == info.max
    # Outputs read in memory order (permuted, channels-last) or as they are (a slice with gaps, an
    # expanded tensor), then a smaller tensor into the same buffer.
    m = torch.arange(-6.0, 6.0, dtype=dtype).reshape(3, 4)
    image = torch.linspace(-1, 1, 2 * 3 * 4 * 5, dtype=dtype).reshape(2, 3, 4, 5)
    for view in (m.t(), m[:, ::2], m[:1].expand(5, 4), image.permute(0, 2, 3, 1),
                 image.contiguous(memory_format=torch.channels_last)):
        assert st.host_row(view, scratch) == st.device_row(view).tolist()
    assert st.host_row(x[:3], scratch) == st.device_row(x[:3]).tolist()


_FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("src", _FLOATS)
@pytest.mark.parametrize("out", _FLOATS)
def test_a_cast_s_row_from_its_input_s_row_is_the_measured_one_or_none(src, out):
    # Rounding to nearest is monotone, so a cast's row follows from its input's unless values overflow
    # or reach the subnormal range. Scales from below fp16's smallest subnormal to above bf16's max,
    # with zeros, infinities and NaN mixed in, and the values at each dtype's edges.
    gen = torch.Generator().manual_seed(0)
    edges = [v for dt in _FLOATS for v in (torch.finfo(dt).max, torch.finfo(dt).smallest_normal,
                                           torch.finfo(dt).tiny * torch.finfo(dt).eps)]
    derived = 0
    for i in range(300):
        scale = 10.0 ** float(torch.empty(1).uniform_(-45, 40, generator=gen))
        x = torch.randn(int(torch.randint(1, 64, (1,), generator=gen)), generator=gen, dtype=torch.float64) * scale
        if i % 3 == 0:
            x[::4] = 0.0
        if i % 7 == 0:
            x[0] = [math.inf, -math.inf, math.nan][i % 3]
        if i % 5 == 0:
            x[-1] = edges[i % len(edges)] * (1 if i % 2 else -1)
        x = x.to(src)
        row = st.host_row(x)
        cast = st.cast_row(row, src, out)
        if cast is not None:
            derived += 1
            assert cast == pytest.approx(st.host_row(x.to(out)), rel=0, abs=0, nan_ok=True), (x, out)
    assert derived > 20  # not vacuous: a good share of the casts are told without reading them


def _specials(dtype, n, gen):
    """n values of dtype over its whole range: normals, subnormals, zeros of both signs, its edges, and
    (in some tensors) infinities and NaN."""
    info = torch.finfo(dtype)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x *= 10.0 ** torch.empty(n, dtype=torch.float64).uniform_(-50, 10, generator=gen)
    x = x.to(dtype)
    pick = torch.randint(0, 8, (n,), generator=gen)
    x[pick == 0] = 0.0
    x[pick == 1] = -0.0
    x[pick == 2] = info.smallest_normal * 0.5
    return x


@pytest.mark.skipif(not st.has_c_scan(), reason="nanprobe's C scan is not built (no C compiler at install time)")
@pytest.mark.parametrize("dtype", _FLOATS)
def test_the_c_scan_and_the_torch_ops_give_the_same_rows(dtype, monkeypatch):
    # Sizes around the counting pass's block (32768), so that the narrow counters' flush is crossed;
    # one all-subnormal tensor longer than a block; memory-order layouts; non-finite values.
    gen = torch.Generator().manual_seed(1)
    info = torch.finfo(dtype)
    tensors = [_specials(dtype, n, gen) for n in (1, 7, 32767, 32768, 32769, 100_003)]
    tensors.append(torch.full((70_000,), info.smallest_normal / 2, dtype=dtype))
    tensors.append(torch.full((70_000,), -0.0, dtype=dtype))
    image = _specials(dtype, 2 * 3 * 8 * 8, gen).reshape(2, 3, 8, 8)
    tensors += [image.permute(0, 2, 3, 1), image.contiguous(memory_format=torch.channels_last), image[:, 1]]
    for special in (math.inf, -math.inf, math.nan):
        t = _specials(dtype, 1000, gen)
        t[500] = special
        tensors.append(t)
    c = [st.host_row(t) for t in tensors]
    monkeypatch.setattr(st, "_SCAN", None)
    slow = [st.host_row(t) for t in tensors]
    for a, b in zip(c, slow):
        assert a == pytest.approx(b, rel=0, abs=0, nan_ok=True)
    assert c[6][st.SUBNORMAL] == 70_000 and c[7][st.ZEROS] == 70_000  # not vacuous: both counts reached
    assert all(r[st.SUBNORMAL] > 0 and r[st.ZEROS] > 0 for r in c[2:6])
