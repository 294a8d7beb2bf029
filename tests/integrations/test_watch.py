"""nanprobe.watch: cheap checks on healthy steps, an exact replay of a failing one, raise / warn / dump."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nanprobe
from nanprobe import ConfigError
from nanprobe.cli import app
from tests.conftest import FIXTURES, checksums, line_of, load_fixture_module

ROOT = Path(__file__).resolve().parents[2]
STEPS_FILE = FIXTURES / "watch_steps.py"
steps = load_fixture_module(STEPS_FILE)
runner = CliRunner()


def models(tiny, seed: int = 0):
    torch.manual_seed(seed)
    critic, generator = tiny.TinyCritic(), tiny.TinyGenerator()
    return critic, generator, torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.9))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 8, generator=g)) for _ in range(n)]


def train(critic, generator, opt, data, loss_fn, w=None, scaler=None, dtype=None):
    """A plain training loop; with w, each step runs inside `with w.step(real, z)`."""
    losses = []
    for real, z in data:
        ctx = w.step(real, z) if w is not None else None
        if ctx is not None:
            s = ctx.__enter__()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = loss_fn(critic, generator, real, z)
        loss = out["loss"] if isinstance(out, dict) else out
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        losses.append(loss.item())
        if ctx is not None:
            s.loss = loss
            ctx.__exit__(None, None, None)
    return losses


def test_a_watched_run_trains_exactly_as_an_unwatched_one(tiny):
    data = batches(3)
    c1, g1, o1 = models(tiny)
    torch.manual_seed(5)
    plain = train(c1, g1, o1, data, steps.penalty_step)
    c2, g2, o2 = models(tiny)
    torch.manual_seed(5)
    with nanprobe.watch(c2, g2, o2, loss=steps.penalty_step) as w:
        watched = train(c2, g2, o2, data, steps.penalty_step, w)
    assert watched == plain
    assert all(torch.equal(a, b) for a, b in zip(c1.state_dict().values(), c2.state_dict().values()))
    assert (w.steps, w.failures, w.failure) == (3, 0, None)
    assert not c2._forward_pre_hooks  # the precision hook lives only inside a step


def test_the_replay_of_a_step_is_exact(tiny):
    """The config of the last step, diagnosed in fp32, gives the loss the live step gave."""
    critic, generator, opt = models(tiny)
    w = nanprobe.watch(critic, generator, opt, loss=steps.penalty_step)
    live = train(critic, generator, opt, batches(2), steps.penalty_step, w)
    report = nanprobe.diagnose(w.config())
    (run,) = report.runs
    assert run.metrics[0].loss == pytest.approx(live[-1], rel=1e-6)
    assert run.metrics[0].penalty is not None


def test_step_with_a_function_returns_its_result(tiny):
    critic, generator, opt = models(tiny)
    w = nanprobe.watch(critic, generator, opt, loss=steps.wasserstein_step)
    real, z = batches(1)[0]

    def train_step(real, z):
        opt.zero_grad()
        loss = steps.wasserstein_step(critic, generator, real, z)
        loss.backward()
        opt.step()
        return loss

    assert isinstance(w.step(train_step, real, z), torch.Tensor)
    assert w.steps == 1 and w.failure is None


def test_the_step_precision_is_read_from_autocast(tiny):
    critic, generator, opt = models(tiny)
    w = nanprobe.watch(critic, generator, opt, loss=steps.wasserstein_step)
    train(critic, generator, opt, batches(1), steps.wasserstein_step, w, dtype=torch.bfloat16)
    config = w.config()
    assert [p.value for p in config.precision.dtypes] == ["fp32", "bf16"]
    assert config.precision.mode.value == "amp"


def test_raise_names_the_op_and_the_line(tiny):
    critic, generator, opt = models(tiny)
    w = nanprobe.watch(critic, generator, opt, loss=steps.zero_norm_step, on_nan="raise")
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    with pytest.raises(nanprobe.NonFiniteError) as info:
        train(critic, generator, opt, batches(2), steps.zero_norm_step, w)
    failure = info.value.failure
    assert failure.step == 0 and "gradients" in failure.reason
    (run,) = info.value.report.runs  # fp32: the step ran in fp32
    assert run.status.value == "nan" and not run.precision_problem
    nf = run.first_nonfinite
    assert nf.phase.value == "backward" and nf.node == "SqrtBackward0"
    assert nf.source.endswith(f"watch_steps.py:{line_of(STEPS_FILE, 'ZERO-NORM')}")
    message = str(info.value)
    assert message.startswith("nanprobe.watch: step 0 turned non-finite (gradients, weights non-finite)")
    assert "SqrtBackward0" in message and "it fails in fp32: this is not a precision problem" in message
    # The replay started from the weights before the step; the live model was left as training left it.
    assert not all(torch.isfinite(v).all() for v in critic.state_dict().values())
    assert all(torch.isfinite(v).all() for v in before.values())


def test_warn_goes_on_and_diagnoses_only_the_first_failure(tiny):
    critic, generator, opt = models(tiny)
    w = nanprobe.watch(critic, generator, opt, loss=steps.zero_norm_step, on_nan="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = train(critic, generator, opt, batches(3), steps.zero_norm_step, w)
    ours = [c for c in caught if issubclass(c.category, nanprobe.NonFiniteWarning)]
    assert len(ours) == 1 and "SqrtBackward0" in str(ours[0].message)
    assert len(losses) == 3 and w.failures == 3 and w.failure.step == 0


def test_a_scaler_skip_that_recovers_is_not_a_failure(tiny):
    """A batch that overflows once: GradScaler skips that step, training goes on at a lower scale."""
    critic, generator, opt = models(tiny)
    scaler = torch.amp.GradScaler("cpu")
    data = batches(3)
    data[0][0][0, 0, 0, 0] = 1e36  # the scaled loss is inf at step 0 only
    w = nanprobe.watch(critic, generator, opt, scaler, loss=steps.wasserstein_step)
    train(critic, generator, opt, data, steps.wasserstein_step, w, scaler=scaler)
    assert (w.steps, w.skipped, w.failures) == (3, 1, 0)
    assert scaler.get_scale() < 65536.0


def test_a_scaler_that_skips_every_step_is_a_failure(tiny):
    critic, generator, opt = models(tiny)
    scaler = torch.amp.GradScaler("cpu")
    w = nanprobe.watch(critic, generator, opt, scaler, loss=steps.zero_norm_step, max_skips=2)
    with pytest.raises(nanprobe.NonFiniteError,
                       match=r"step 2 turned non-finite \(the GradScaler skipped 3 steps in a row"):
        train(critic, generator, opt, batches(4), steps.zero_norm_step, w, scaler=scaler)
    assert w.skipped == 3
    assert w.config().state.scaler["scale"] == 65536.0 / 4  # the scale before the failing step


def test_dump_writes_only_its_folder_and_replays_the_same_verdict(tiny, tmp_path):
    critic, generator, opt = models(tiny)
    data = batches(1)  # one step, so w.config() below is the failing step
    fixtures = checksums(FIXTURES)
    w = nanprobe.watch(critic, generator, opt, loss=steps.zero_norm_step, on_nan="dump", dump_dir=tmp_path / "dumps")
    with pytest.warns(nanprobe.NonFiniteWarning, match="dumped to .*step-000000"):
        train(critic, generator, opt, data, steps.zero_norm_step, w)
    dump = w.failure.dump
    assert w.failure.report is None and dump == tmp_path / "dumps" / "step-000000"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        ["batch.pt", "checkpoint.pt", "config.yaml", "optimizer.pt", "rng.pt", "tiny_models.py", "watch_steps.py",
         "z.pt"])
    assert checksums(FIXTURES) == fixtures
    assert torch.equal(torch.load(dump / "batch.pt"), data[0][0])

    result = runner.invoke(app, ["diagnose", str(dump / "config.yaml"), "--json", "-", "-q"])
    assert result.exit_code == 1, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert run["status"] == "nan" and run["first_nonfinite"]["node"] == "SqrtBackward0"
    assert run["first_nonfinite"]["source"] == f"watch_steps.py:{line_of(STEPS_FILE, 'ZERO-NORM')}"
    # The same step diagnosed live gives the same numbers.
    live = nanprobe.diagnose(w.config()).runs[0]
    assert run["first_nonfinite"]["detail"] == live.first_nonfinite.detail
    assert run["metrics"][0]["loss"] == pytest.approx(live.metrics[0].loss, rel=1e-6)


def test_a_dump_replays_the_optimizer_state_from_before_the_step(tiny, tmp_path):
    critic, generator, opt = models(tiny)
    w = nanprobe.watch(critic, generator, opt, loss=steps.penalty_step, dump_dir=tmp_path)
    train(critic, generator, opt, batches(2), steps.penalty_step, w)  # healthy: nothing dumped
    assert not any(tmp_path.iterdir())
    state = w.config().state.optimizer
    assert state["state"][0]["step"] == 1  # Adam had taken one step before the last one
    assert state["param_groups"][0]["foreach"] is False


@pytest.mark.parametrize("kwargs, message", [
    ({"on_nan": "explode"}, "on_nan must be one of raise, warn, dump, got 'explode'"),
    ({"on_nan": "dump"}, "on_nan='dump' needs dump_dir"),
    ({"loss": "wgan"},
     "loss.kind: must be one of wgan-gp, r1, hinge, non-saturating, got 'wgan' (did you mean 'wgan-gp'?)"),
    ({"loss": lambda critic, real: 0}, "must take (critic, generator, real, z)"),
    ({"loss": lambda c, g, r, z: 0, "dump_dir": "d"}, "a dump's config cannot name the loss function (<lambda>"),
    ({"critic_args": {"ch": 8}, "dump_dir": "d"},
     "TinyCritic(**{'ch': 8}) builds a critic whose weights do not fit yours"),
    ({"critic_args": {"width": 8}, "dump_dir": "d"}, "TinyCritic(**critic_args) raised TypeError"),
    ({"max_skips": -1}, "max_skips must be an integer >= 0"),
    ({"precision": "fp8"}, "precision: must be one of fp32, fp16, bf16"),
])
def test_bad_arguments_fail_at_once_with_one_line(tiny, kwargs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    critic, generator, opt = models(tiny)
    with pytest.raises(ConfigError) as info:
        nanprobe.watch(critic, generator, opt, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_a_step_without_z_needs_latent_dim(tiny):
    critic, generator, opt = models(tiny)
    w = nanprobe.watch(critic, generator, opt, loss="wgan-gp")  # a replay needs z
    with pytest.raises(ConfigError, match="pass z to step"):
        with w.step(batches(1)[0][0]):
            pass


# ---- the shipped example: a real training loop that goes NaN under fp16


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    example = load_fixture_module(ROOT / "examples" / "train_wgan_gp.py", "train_wgan_gp")
    dump_dir = tmp_path_factory.mktemp("dumps")
    lines: list[str] = []
    with pytest.raises(nanprobe.NonFiniteError) as info:
        example.train(steps=3, on_nan="raise", dump_dir=str(dump_dir), log=lines.append)
    return info.value


def _culprit(run: dict) -> tuple:
    issue = run["first_issue"]
    return (run["status"], issue["kind"], issue["phase"], issue["module"], issue["op"], run["fixes"][0]["id"])


def test_the_example_is_caught_with_the_culprit_and_fix_diagnose_gives(example_run):
    shipped = nanprobe.diagnose(ROOT / "configs" / "wgan_gp_fp16_underflow.yaml", dtypes=["fp16"], device="cpu")
    expected = {r["precision"]: r for r in shipped.to_dict()["runs"]}["fp16"]
    caught = {r["precision"]: r for r in example_run.report.to_dict()["runs"]}
    # The loop's batch is real data, the config's is synthetic: where the input gradient first flushes to
    # zero on the way back from the NaN can be a layer apart, so the layer is checked by its family.
    for culprit in (_culprit(caught["fp16"]), _culprit(expected)):
        status, kind, phase, module, _, fix = culprit
        assert (status, kind, phase, fix) == ("nan", "underflow", "input-grad", "gp-fp32")
        assert module.startswith("critic.net.")
    assert caught["fp32"]["status"] == "ok"
    assert example_run.failure.step == 0
    assert str(example_run).startswith("nanprobe.watch: step 0 turned non-finite")
    assert "fix: gp-fp32" in str(example_run)


def test_the_example_dump_replays_with_the_same_verdict(example_run):
    dump = example_run.failure.dump
    assert (dump / "models.py").is_file() and (dump / "train_wgan_gp.py").is_file()
    result = runner.invoke(app, ["diagnose", str(dump / "config.yaml"), "--json", "-", "-q"])
    assert result.exit_code == 1, result.output
    replayed = {r["precision"]: r for r in json.loads(result.stdout)["runs"]}
    live = {r["precision"]: r for r in example_run.report.to_dict()["runs"]}
    assert _culprit(replayed["fp16"]) == _culprit(live["fp16"])
    assert replayed["fp16"]["first_issue"]["detail"] == live["fp16"]["first_issue"]["detail"]
    assert replayed["fp32"]["metrics"] == live["fp32"]["metrics"]
