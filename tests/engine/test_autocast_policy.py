"""precision.policy: a CPU autocast that casts each op as CUDA autocast would, in forward and backward."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

import nanprobe
from nanprobe.cli import app
from nanprobe.engine import autocast_policy as ap
from nanprobe.engine import replay
from nanprobe.enums import Precision
from nanprobe.io import config as cfg
from nanprobe.io import loading
from tests.conftest import base_doc, merge

LOW = [torch.float16, torch.bfloat16]


class _Ops(TorchDispatchMode):
    """Records (op, output dtype, output shape) of every op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, torch.dtype, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.ops.append((str(func), out.dtype, tuple(out.shape)))
        return out


def _x(shape=(4, 8), seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape)


# ---- the table


def test_table_matches_the_autocast_kernels_this_torch_registers():
    """Every build, CPU-only too, registers CUDA's autocast kernels: a torch upgrade that moves them fails here."""
    cuda = {n.removeprefix("aten::") for n in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")}
    cpu = {n.removeprefix("aten::") for n in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU")}
    table = ap.cuda_policy()
    assert sum(len(ops) for ops in ap.CUDA_OPS.values()) == len(table)  # no op in two lists
    assert set(table) == cuda
    assert set(ap.CPU_ONLY) == cpu - cuda
    assert torch.__version__.startswith(ap.TORCH_VERSION)


# ---- forward dtypes


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_matmul_and_conv_run_in_the_low_dtype(dtype):
    x, w = _x(), _x((8, 8), 1)
    img, k = _x((1, 3, 6, 6), 2), _x((2, 3, 3, 3), 3)
    with ap.cuda_autocast(dtype):
        outs = {"mm": x @ w, "linear": F.linear(x, w), "conv2d": F.conv2d(img, k),
                "conv2d same": F.conv2d(img, k, padding="same"), "bmm": torch.bmm(x[None], w[None])}
    assert {name: o.dtype for name, o in outs.items()} == {name: dtype for name in outs}


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_reductions_norms_and_losses_run_in_fp32(dtype):
    x = _x().to(dtype)
    with ap.cuda_autocast(dtype):
        outs = {"pow": x ** 2, "sum": torch.sum(x, dim=1), "softmax": torch.softmax(x, 1),
                "log_softmax": F.log_softmax(x, 1), "layer_norm": F.layer_norm(x, (8,)), "exp": x.exp(),
                "log": x.abs().log(), "mse_loss": F.mse_loss(x, x * 0.5), "group_norm": F.group_norm(x[..., None], 2),
                "norm": x.norm(dim=1), "vector_norm": torch.linalg.vector_norm(x, dim=1), "rsqrt": x.abs().rsqrt()}
        explicit = torch.sum(x, dim=1, dtype=dtype)  # an explicit dtype is respected, as on CUDA
    assert {name: o.dtype for name, o in outs.items()} == {name: torch.float32 for name in outs}
    assert explicit.dtype == dtype
    # The same ops under the CPU's own autocast stay in the low dtype: that is the difference.
    with torch.autocast("cpu", dtype=dtype):
        assert (x ** 2).dtype == torch.sum(x, dim=1).dtype == torch.softmax(x, 1).dtype == dtype


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_promote_ops_run_in_the_widest_input_dtype(dtype):
    a, b = _x(), _x(seed=1).to(dtype)
    with ap.cuda_autocast(dtype):
        mixed = torch.addcmul(a, b, b)
        low = torch.addcmul(b, b, b)
        dot = torch.dot(a[0], b[0])
    assert (mixed.dtype, low.dtype, dot.dtype) == (torch.float32, dtype, torch.float32)


def test_casts_are_made_in_the_order_autocasts_own_kernels_make_them():
    """The probe numbers ops in order: a cast made earlier or later would shift every index after it."""
    conv = torch.nn.Conv2d(3, 2, 3)
    img = _x((1, 3, 6, 6))

    def cast_shapes(ctx):
        with _Ops() as rec, ctx:
            conv(img)
        return [shape for op, _, shape in rec.ops if op == "aten._to_copy.default"]

    emulated = cast_shapes(ap.cuda_autocast(torch.float16))
    assert emulated == cast_shapes(torch.autocast("cpu", dtype=torch.float16))
    assert sorted(emulated) == sorted([(2,), (2, 3, 3, 3), (1, 3, 6, 6)])


def test_binary_cross_entropy_is_refused_as_on_cuda():
    p = torch.rand(4)
    with ap.cuda_autocast(torch.bfloat16), pytest.raises(RuntimeError, match="unsafe to autocast"):
        F.binary_cross_entropy(p, p)


def test_weights_are_cast_once_per_region_as_autocast_caches_them():
    layer = torch.nn.Linear(8, 8)
    x = _x()

    def casts(ctx):
        with _Ops() as rec, ctx:
            layer(x), layer(x)
        return sum(op.startswith("aten._to_copy") for op, _, _ in rec.ops)

    assert casts(ap.cuda_autocast(torch.bfloat16)) == casts(torch.autocast("cpu", dtype=torch.bfloat16)) == 4
    assert ap._local.cache == {}  # cleared with the region, as autocast's own cache is


# ---- backward


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_backward_of_fp32_ops_runs_in_fp32(dtype):
    x = _x().to(dtype).requires_grad_(True)

    def backward_ops(ctx):
        with ctx:
            y = torch.softmax(x ** 3, dim=1).sum()
        with _Ops() as rec:
            y.backward()
        x.grad = None
        return [(op, d) for op, d, _ in rec.ops]

    emulated = backward_ops(ap.cuda_autocast(dtype))
    compute = [d for op, d in emulated if not op.startswith(("aten._to_copy", "aten.detach"))]
    assert compute and set(compute) == {torch.float32}
    casts = [d for op, d in emulated if op.startswith("aten._to_copy")]
    assert casts == [dtype]  # only the finished gradient goes back to x's dtype
    native = backward_ops(torch.autocast("cpu", dtype=dtype))
    assert dtype in {d for op, d in native if op.startswith(("aten.pow", "aten.mul"))}


def test_penalty_input_gradient_and_its_double_backward_follow_the_forward_dtypes():
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
    x = _x().requires_grad_(True)
    with ap.cuda_autocast(torch.float16):
        out = critic(x)
        g = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)[0]
        norm = torch.sqrt(torch.sum(g ** 2, dim=1))
        penalty = ((norm - 1) ** 2).mean()
    assert out.dtype == torch.float16  # linear: low precision
    assert torch.sum(g ** 2, dim=1).dtype == torch.float32  # pow and sum: fp32, as on CUDA
    with _Ops() as rec:
        penalty.backward()
    pows = [d for op, d, _ in rec.ops if op.startswith("aten.pow")]
    assert pows and set(pows) == {torch.float32}
    assert critic[0].weight.grad.dtype == torch.float32 and torch.isfinite(critic[0].weight.grad).all()


# ---- registration


def _dumps():
    names = ("pow.Tensor_Scalar", "mm", "conv2d.padding", "cat")
    return {name: torch._C._dispatch_dump(f"aten::{name}") for name in names}


def test_registration_is_removed_on_exit_and_cpu_autocast_works_again():
    before = _dumps()
    with ap.cuda_autocast(torch.bfloat16):
        assert ap.is_active() and _dumps() != before
    assert not ap.is_active() and _dumps() == before
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x.T).dtype == torch.bfloat16
        assert (x.bfloat16() ** 2).dtype == torch.bfloat16  # CPU autocast's own lists again


def test_registration_is_removed_after_an_exception_inside():
    before = _dumps()
    with pytest.raises(ZeroDivisionError):
        with ap.cuda_autocast(torch.float16):
            _ = 1 / 0
    assert not ap.is_active() and _dumps() == before


def test_registration_is_made_once_and_kept_while_nested():
    before = _dumps()
    with ap.cuda_op_lists():
        during = _dumps()
        for _ in range(2):
            with ap.cuda_autocast(torch.bfloat16):
                with ap.cuda_autocast(torch.bfloat16):
                    pass
            assert _dumps() == during and ap.is_active()
    assert _dumps() == before


def test_a_torch_whose_cuda_lists_hold_unknown_ops_is_refused_in_one_line(monkeypatch):
    real = ap._registered
    monkeypatch.setattr(ap, "_registered",
                        lambda key: real(key) | ({"fancy_new_op"} if key == "AutocastCUDA" else set()))
    before = _dumps()
    with pytest.raises(nanprobe.DeviceError, match=r"also autocasts fancy_new_op; use --policy native"):
        with ap.cuda_autocast(torch.float16):
            pass
    assert not ap.is_active() and _dumps() == before


# ---- the replay and the policy setting


def _replay_ops(tmp_path, policy: str) -> dict[str, set]:
    doc = merge(base_doc(), {"loss": {"kind": "non-saturating"},
                             "precision": {"dtypes": ["fp32", "bf16"], "policy": policy}})
    config = cfg.from_dict(doc, base_dir=tmp_path)
    trace = replay.replay(config, loading.load(config), Precision.BF16, torch.device("cpu"))
    found: dict[str, set] = {}
    for e in trace.events:
        found.setdefault(e.op, set()).add(e.dtype)
    return found


def test_replay_follows_the_policy(tmp_path):
    cuda, native = _replay_ops(tmp_path, "cuda"), _replay_ops(tmp_path, "native")
    # softplus(-D(x)) of the non-saturating loss: fp32 as on a GPU, bf16 under CPU autocast.
    assert cuda["aten.softplus.default"] == {"float32"}
    assert native["aten.softplus.default"] == {"bfloat16"}
    assert cuda["aten.convolution.default"] == native["aten.convolution.default"] == {"bfloat16"}
    assert not ap.is_active()


_SQUARED_SCORE_STEP = """
def critic_step(critic, generator, real, z):
    score = critic(real) * 4000.0  # ~1e2 to 1e3: fine in fp16
    return (score ** 2).mean() * 1e-6  # squared: past fp16's 65504 unless pow runs in fp32
"""


def test_the_policy_decides_a_verdict_the_way_a_gpu_would(tmp_path):
    """On CUDA, pow autocasts to fp32, so the squared score does not overflow; CPU autocast keeps it fp16."""
    (tmp_path / "step.py").write_text(_SQUARED_SCORE_STEP, encoding="utf-8")
    doc = merge(base_doc(), {"loss": {"step": "step.py:critic_step"}, "precision": {"dtypes": ["fp16"]}})
    config = cfg.from_dict(doc, base_dir=tmp_path)
    cuda = nanprobe.diagnose(config).runs[0]
    native = nanprobe.diagnose(config, policy="native").runs[0]
    assert cuda.status.value == "ok", cuda.first_issue
    assert native.status.value in ("overflow", "nan")
    assert (native.first_issue.kind.value, native.first_issue.op) == ("overflow", "aten.pow.Tensor_Scalar")
    assert native.first_issue.source == "step.py:4"


runner = CliRunner()


def test_cli_policy_flag_is_reported_in_the_settings(write_config):
    path = write_config(precision={"dtypes": ["bf16"]})
    for policy in ("native", "cuda"):
        result = runner.invoke(app, ["diagnose", str(path), "--policy", policy, "--json", "-", "-q"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["settings"]["precision"]["policy"] == policy


def test_compare_precisions_takes_the_policy_too(write_config):
    path = write_config(precision={"dtypes": ["bf16"]})
    result = runner.invoke(app, ["compare-precisions", str(path), "--policy", "native", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["precision"]["policy"] == "native"


def test_cli_help_shows_the_policy_option():
    result = runner.invoke(app, ["diagnose", "--help"])
    assert result.exit_code == 0 and "--policy" in result.stdout


def test_cli_bad_policy_is_one_line_and_exit_2(write_config):
    result = runner.invoke(app, ["diagnose", str(write_config()), "--policy", "gpu"])
    assert result.exit_code == 2
    assert result.stderr == "nanprobe: error: precision.policy: must be one of cuda, native, got 'gpu'\n"


def test_bad_policy_in_the_yaml_is_one_line_and_exit_2(write_config):
    result = runner.invoke(app, ["diagnose", str(write_config(precision={"policy": "cudaa"}))])
    assert result.exit_code == 2
    assert result.stderr == ("nanprobe: error: precision.policy: must be one of cuda, native, "
                             "got 'cudaa' (did you mean 'cuda'?)\n")


# ---- against real CUDA autocast (only where a GPU is present)

# One small call per op of the table, through its public API where it has one.
_V, _M, _S = (lambda d: _x((6,)).to(d)), (lambda d: _x((4, 4)).to(d)), (lambda d: _x((2, 3, 4, 4)).to(d))


def _POS(d):
    return (_x((4, 4)).abs() + 0.5).to(d)


def _UNIT(d):
    return (_x((4, 4)).tanh() * 0.5).to(d)


SAMPLES = {
    "conv1d": lambda d: F.conv1d(_x((1, 3, 8)).to(d), _x((2, 3, 3))),
    "conv2d": lambda d: F.conv2d(_S(d), _x((2, 3, 3, 3))),
    "conv3d": lambda d: F.conv3d(_x((1, 3, 4, 4, 4)).to(d), _x((2, 3, 3, 3, 3))),
    "conv_transpose1d": lambda d: F.conv_transpose1d(_x((1, 3, 8)).to(d), _x((3, 2, 3))),
    "conv_transpose2d.input": lambda d: F.conv_transpose2d(_S(d), _x((3, 2, 3, 3))),
    "conv_transpose3d.input": lambda d: F.conv_transpose3d(_x((1, 3, 4, 4, 4)).to(d), _x((3, 2, 3, 3, 3))),
    "conv_tbc": lambda d: torch.conv_tbc(_x((5, 2, 3)).to(d), _x((3, 3, 4)), _x((4,))),
    "convolution": lambda d: torch.convolution(_S(d), _x((2, 3, 3, 3)), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
    "prelu": lambda d: F.prelu(_S(d), _x((1,))),
    "addmm": lambda d: torch.addmm(_M(d), _M(d), _x((4, 4))),
    "addmv": lambda d: torch.addmv(_x((4,)).to(d), _M(d), _x((4,))),
    "addr": lambda d: torch.addr(_M(d), _x((4,)), _x((4,))),
    "matmul": lambda d: torch.matmul(_M(d), _x((4, 4))),
    "einsum": lambda d: torch.einsum("ij,jk->ik", _M(d), _x((4, 4))),
    "mm": lambda d: torch.mm(_M(d), _x((4, 4))),
    "mv": lambda d: torch.mv(_M(d), _x((4,))),
    "linalg_vecdot": lambda d: torch.linalg.vecdot(_M(d), _x((4, 4))),
    "linear": lambda d: F.linear(_M(d), _x((3, 4))),
    "addbmm": lambda d: torch.addbmm(_M(d), _x((2, 4, 4)), _x((2, 4, 4))),
    "baddbmm": lambda d: torch.baddbmm(_x((2, 4, 4)).to(d), _x((2, 4, 4)), _x((2, 4, 4))),
    "bmm": lambda d: torch.bmm(_x((2, 4, 4)).to(d), _x((2, 4, 4))),
    "chain_matmul": lambda d: torch.chain_matmul(_M(d), _x((4, 4)), _x((4, 4))),
    "linalg_multi_dot": lambda d: torch.linalg.multi_dot([_M(d), _x((4, 4))]),
    "lstm_cell": lambda d: torch.nn.LSTMCell(4, 4)(_M(d))[0],
    "gru_cell": lambda d: torch.nn.GRUCell(4, 4)(_M(d)),
    "rnn_tanh_cell": lambda d: torch.nn.RNNCell(4, 4)(_M(d)),
    "rnn_relu_cell": lambda d: torch.nn.RNNCell(4, 4, nonlinearity="relu")(_M(d)),
    "scaled_dot_product_attention": lambda d: F.scaled_dot_product_attention(*(_x((1, 2, 4, 8)).to(d),) * 3),
    **{name: (lambda n: lambda d: getattr(torch, n)(_UNIT(d)))(name)
       for name in ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "sinh", "tan")},
    **{name: (lambda n: lambda d: getattr(torch, n)(_POS(d)))(name)
       for name in ("log", "log10", "log2", "log1p", "reciprocal", "rsqrt")},
    "logsumexp": lambda d: torch.logsumexp(_M(d), 1),
    "pow.Tensor_Scalar": lambda d: _M(d) ** 2,
    "pow.Tensor_Tensor": lambda d: _POS(d) ** _M(d),
    "pow.Scalar": lambda d: 2 ** _M(d),
    "softplus": lambda d: F.softplus(_M(d)),
    "layer_norm": lambda d: F.layer_norm(_M(d), (4,)),
    "rms_norm": lambda d: F.rms_norm(_M(d), (4,)),
    "group_norm": lambda d: F.group_norm(_S(d), 3),
    "frobenius_norm.dim": lambda d: torch.frobenius_norm(_M(d), [0, 1]),
    "nuclear_norm": lambda d: torch.nuclear_norm(_M(d)),
    "cosine_similarity": lambda d: F.cosine_similarity(_M(d), _M(d)),
    "poisson_nll_loss": lambda d: F.poisson_nll_loss(_M(d), _POS(d)),
    "cosine_embedding_loss": lambda d: F.cosine_embedding_loss(_M(d), _M(d), torch.ones(4)),
    "nll_loss": lambda d: F.nll_loss(_M(d), torch.zeros(4, dtype=torch.long)),
    "hinge_embedding_loss": lambda d: F.hinge_embedding_loss(_M(d), torch.ones(4, 4)),
    "kl_div": lambda d: F.kl_div(_M(d), _M(d), reduction="batchmean"),
    "l1_loss": lambda d: F.l1_loss(_M(d), _M(d)),
    "smooth_l1_loss": lambda d: F.smooth_l1_loss(_M(d), _M(d)),
    "huber_loss": lambda d: F.huber_loss(_M(d), _M(d)),
    "mse_loss": lambda d: F.mse_loss(_M(d), _M(d)),
    "margin_ranking_loss": lambda d: F.margin_ranking_loss(_V(d), _V(d), torch.ones(6)),
    "soft_margin_loss": lambda d: F.soft_margin_loss(_M(d), torch.ones(4, 4)),
    "triplet_margin_loss": lambda d: F.triplet_margin_loss(_M(d), _M(d), _M(d)),
    "multi_margin_loss": lambda d: F.multi_margin_loss(_M(d), torch.zeros(4, dtype=torch.long)),
    "binary_cross_entropy_with_logits": lambda d: F.binary_cross_entropy_with_logits(_M(d), torch.rand(4, 4)),
    "dist": lambda d: torch.dist(_M(d), _M(d)),
    "pdist": lambda d: F.pdist(_M(d)),
    "cdist": lambda d: torch.cdist(_M(d), _M(d)),
    "renorm": lambda d: torch.renorm(_M(d), 2, 0, 1.0),
    "upsample_nearest2d": lambda d: F.interpolate(_S(d), scale_factor=2, mode="nearest"),
    "upsample_bilinear2d": lambda d: F.interpolate(_S(d), scale_factor=2, mode="bilinear"),
    "upsample_bicubic2d": lambda d: F.interpolate(_S(d), scale_factor=2, mode="bicubic"),
    "prod": lambda d: torch.prod(_M(d)),
    "prod.dim_int": lambda d: torch.prod(_M(d), 1),
    "softmax.int": lambda d: torch.softmax(_M(d), 1),
    "log_softmax.int": lambda d: torch.log_softmax(_M(d), 1),
    "cumprod": lambda d: torch.cumprod(_M(d), 1),
    "cumsum": lambda d: torch.cumsum(_M(d), 1),
    "linalg_vector_norm": lambda d: torch.linalg.vector_norm(_M(d)),
    "linalg_matrix_norm": lambda d: torch.linalg.matrix_norm(_M(d)),
    "linalg_matrix_norm.str_ord": lambda d: torch.linalg.matrix_norm(_M(d), "fro"),
    "sum": lambda d: torch.sum(_M(d)),
    "sum.dim_IntList": lambda d: torch.sum(_M(d), 1),
    "norm.Scalar": lambda d: torch.norm(_M(d)),
    "norm.ScalarOpt_dim": lambda d: torch.norm(_M(d), dim=1),
    "addcdiv": lambda d: torch.addcdiv(_M(d), _x((4, 4)), _POS(d)),
    "addcmul": lambda d: torch.addcmul(_M(d), _x((4, 4)), _M(d)),
    "atan2": lambda d: torch.atan2(_M(d), _x((4, 4))),
    "bilinear": lambda d: F.bilinear(_M(d), _x((4, 4)), _x((2, 4, 4))),
    "cross": lambda d: torch.cross(_x((4, 3)).to(d), _x((4, 3)), dim=1),
    "dot": lambda d: torch.dot(_V(d), _x((6,))),
    "vdot": lambda d: torch.vdot(_V(d), _x((6,))),
    "grid_sampler": lambda d: F.grid_sample(_S(d), _x((2, 4, 4, 2)).tanh(), align_corners=False),
    "index_put": lambda d: _M(d).index_put((torch.tensor([0, 1]),), _x((2, 4))),
    "tensordot": lambda d: torch.tensordot(_M(d), _x((4, 4)), 1),
    "scatter_add": lambda d: _M(d).scatter_add(0, torch.zeros(4, 4, dtype=torch.long), _x((4, 4))),
}


def test_samples_cover_every_cast_policy():
    for cast, ops in ap.CUDA_OPS.items():
        if cast is not ap.Cast.BANNED:
            assert set(ops) & set(SAMPLES), cast


@pytest.mark.filterwarnings("ignore:.*deprecated:UserWarning")  # chain_matmul, frobenius_norm: still in the lists
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_every_sample_runs_in_the_dtype_its_policy_gives(dtype):
    """Each promote sample mixes an fp32 input in, so only the lower-precision list stays low."""
    policy = ap.cuda_policy()
    for name, sample in SAMPLES.items():
        with ap.cuda_autocast(dtype):
            got = sample(dtype).dtype
        assert got == (dtype if policy[name] is ap.Cast.LOWER else torch.float32), name


@pytest.mark.filterwarnings("ignore:.*deprecated:UserWarning")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compare against")
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_table_matches_what_cuda_autocast_produces(name, dtype):
    def run(device, ctx):
        torch.manual_seed(0)
        with torch.device(device), ctx:
            return SAMPLES[name](dtype).dtype

    assert run("cpu", ap.cuda_autocast(dtype)) == run("cuda", torch.autocast("cuda", dtype=dtype)), name
