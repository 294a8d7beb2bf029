import math

import pytest
import torch

from nanprobe import stats as st


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
