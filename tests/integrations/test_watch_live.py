"""nanprobe.watch around plain training code: every usage watches, and the flight recorder names the op live."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import nanprobe
from nanprobe import ConfigError
from tests.conftest import FIXTURES, line_of, load_fixture_module

STEPS_FILE = FIXTURES / "watch_steps.py"
steps = load_fixture_module(STEPS_FILE)


class Critic(nn.Module):
    """A small conv critic with a linear head, as users write them."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten())
        self.head = nn.Linear(8 * 4 * 4, 1)

    def forward(self, x):
        return self.head(self.features(x))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 8, 8, generator=g) * 2 - 1 for _ in range(n)]


def critic_and_opt(seed: int = 0, **adam):
    torch.manual_seed(seed)
    critic = Critic()
    return critic, torch.optim.Adam(critic.parameters(), **{"lr": 1e-4, "betas": (0.0, 0.9), **adam})


def test_with_watch_around_a_drifting_fp16_step_raises_at_the_first_bad_step():
    """The usage people write first: `with nanprobe.watch(...)` around the step body, no loss, no batch."""
    critic, opt = critic_and_opt()
    seen = []
    with pytest.raises(nanprobe.NonFiniteError) as info:
        for i, real in enumerate(batches(8)):
            with torch.no_grad():
                critic.head.weight.mul_(8.0)  # the critic's output drifts up, step after step
            with nanprobe.watch(critic, optimizer=opt, on_nan="raise"):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.float16):
                    score = critic(real)
                loss = -score.float().mean()
                loss.backward()
                opt.step()
            seen.append((i, score.float().abs().max().item()))
    # Every step before the raise was finite in fp16; the raise came at the first that was not.
    assert seen and all(v < 65504 for _, v in seen)
    first_bad = len(seen)
    assert first_bad > 1
    culprit = info.value.failure.culprit
    assert (culprit.phase.value, culprit.module, culprit.kind.value, culprit.dtype) == (
        "forward", "critic.head", "overflow", "float16")
    assert culprit.source.endswith(f"test_watch_live.py:{line_of(Path(__file__), 'return self.head(')}")
    message = str(info.value)
    assert message.startswith("nanprobe.watch: step 0 turned non-finite (critic output")
    assert "in critic.head (forward)" in message and "made inf in float16" in message
    assert "pass loss=" in message  # no replay was possible: it says what would give one


def test_a_kept_watch_checks_each_with_block_and_trains_as_unwatched():
    data = batches(3)
    plain_c, plain_o = critic_and_opt()
    for real in data:
        plain_o.zero_grad()
        plain_c(real).mean().backward()
        plain_o.step()
    critic, opt = critic_and_opt()
    w = nanprobe.watch(critic, optimizer=opt)
    for real in data:
        with w:
            opt.zero_grad()
            critic(real).mean().backward()
            opt.step()
    assert (w.steps, w.failures) == (3, 0)
    assert w.flight is not None and w.flight.ops > 10 and w.flight.first_nonfinite is None
    assert all(torch.equal(a, b) for a, b in zip(plain_c.state_dict().values(), critic.state_dict().values()))
    assert not critic._forward_hooks and not critic._forward_pre_hooks and not critic.head._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_with_watch_around_a_loop_of_steps_watches_each_step():
    critic, opt = critic_and_opt()
    with nanprobe.watch(critic, optimizer=opt) as w:
        for real in batches(3):
            with w.step(real):
                opt.zero_grad()
                critic(real).mean().backward()
                opt.step()
    assert w.steps == 3


def test_the_recorder_names_a_backward_nan_with_no_loss_function():
    """A penalty whose norm is 0: sqrt's backward makes NaN from finite values, in every precision."""
    torch.manual_seed(0)
    tiny = load_fixture_module(FIXTURES / "tiny_models.py")
    critic, generator = tiny.TinyCritic(), tiny.TinyGenerator()
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    w = nanprobe.watch(critic, optimizer=opt, on_nan="warn")
    with pytest.warns(nanprobe.NonFiniteWarning) as caught:
        for real in batches(2):
            with w:
                opt.zero_grad()
                steps.zero_norm_step(critic, generator, real, None)["loss"].backward()
                opt.step()
    culprit = w.failure.culprit
    # sqrt's backward divides by 2 * sqrt(0): the first non-finite value is that inf (NaN follows from it).
    assert (culprit.phase.value, culprit.node, culprit.max_abs) == ("backward", "SqrtBackward0", float("inf"))
    assert culprit.source.endswith(f"watch_steps.py:{line_of(STEPS_FILE, 'ZERO-NORM')}")
    assert len([c for c in caught if issubclass(c.category, nanprobe.NonFiniteWarning)]) == 1
    assert w.failure.step == 0 and w.failures == 2


def test_the_recorder_names_the_optimizer_op_and_the_parameter():
    """Adam with eps=0 divides 0 by 0 for a weight whose gradient is exactly 0."""
    critic, opt = critic_and_opt(eps=0.0)
    w = nanprobe.watch(critic, optimizer=opt, on_nan="warn")
    real = batches(1)[0]
    with pytest.warns(nanprobe.NonFiniteWarning, match=r"\(optimizer\)"):
        with w:
            opt.zero_grad()
            (critic(real).mean() * 0).backward()  # every gradient is exactly 0
            opt.step()
    culprit = w.failure.culprit
    assert culprit.phase.value == "optimizer" and culprit.module.startswith("critic.")
    assert culprit.kind.value == "nan" and w.failure.reason == "weights non-finite"


def test_the_recorder_reports_no_false_alarm_through_a_scaler_skip():
    """fp16 with a GradScaler: the first scale overflows on purpose and the step is skipped; no failure."""
    critic, opt = critic_and_opt()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    w = nanprobe.watch(critic, optimizer=opt, scaler=scaler, record=True)
    for real in batches(4):
        with w:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = critic(real).float().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert (w.steps, w.failures) == (4, 0) and w.skipped >= 1


@pytest.mark.parametrize("make, message", [
    (lambda c, o: nanprobe.watch(c.head.weight), "critic must be an nn.Module, got Parameter"),
    (lambda c, o: nanprobe.watch(nn.ReLU()), "has no parameters"),
    (lambda c, o: nanprobe.watch(c, optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1)),
     "the optimizer updates none of the critic's parameters"),
    (lambda c, o: nanprobe.watch(c, generator=3), "generator must be a callable"),
    (lambda c, o: nanprobe.watch(c, record="yes"), "record must be True, False or None"),
])
def test_what_cannot_be_watched_fails_at_once(make, message):
    critic, opt = critic_and_opt()
    with pytest.raises(ConfigError) as info:
        make(critic, opt)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nested_blocks_fail_at_once():
    critic, opt = critic_and_opt()
    w = nanprobe.watch(critic, optimizer=opt)
    with pytest.raises(ConfigError, match="already running"):
        with w:
            with w:
                pass
    assert not critic._forward_hooks


def test_a_watch_leaves_no_mode_or_hook_when_the_step_raises():
    critic, opt = critic_and_opt()
    w = nanprobe.watch(critic, optimizer=opt)
    with pytest.raises(RuntimeError, match="boom"):
        with w:
            critic(batches(1)[0])
            raise RuntimeError("boom")
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None and not critic._forward_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with w:  # usable again
            critic(batches(1)[0]).mean().backward()
    assert w.steps == 1


def test_an_optimizer_closure_keeps_the_forward_phase():
    """LBFGS-style step(closure): the forward and backward inside the closure are not optimizer ops."""
    critic, _ = critic_and_opt()
    opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    real = batches(1)[0]
    w = nanprobe.watch(critic, optimizer=opt, on_nan="warn")

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = critic(real * 1e5).float().mean()  # the input cast to fp16 overflows
        loss.backward()
        return loss

    with pytest.warns(nanprobe.NonFiniteWarning):
        with w:
            opt.step(closure)
            opt.step(closure=closure)
    culprit = w.failure.culprit
    assert (culprit.phase.value, culprit.module, culprit.op) == ("forward", "critic.features.0",
                                                                 "aten._to_copy.default")
