"""nanprobe.analysis.invariance: the parameters a critic does not depend on, found by moving them."""
from __future__ import annotations

import torch
from torch import nn

from nanprobe.analysis.invariance import independent


class INCritic(nn.Module):
    """Biased convs before InstanceNorm, as public WGAN-GP critics write them."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(3, 8, 4, 2, 1), nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(8, 16, 4, 2, 1), nn.InstanceNorm2d(16, affine=True), nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout(0.3))
        self.out = nn.Conv2d(16, 1, 4, 1, 0)

    def forward(self, x):
        return self.out(self.main(x))


class HandNormCritic(nn.Module):
    """A hand-written per-channel centring, and a batch-normed linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.fc = nn.Linear(8 * 8 * 8, 32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        h = self.conv(x)
        h = h - h.mean(dim=(2, 3), keepdim=True)
        h = torch.nn.functional.leaky_relu(h, 0.2)
        return self.head(torch.relu(self.bn(self.fc(h.flatten(1)))))


def _names(model, root="critic"):
    return [f"{root}.{n}" for n, _ in model.named_parameters()]


def test_biases_before_a_per_channel_norm_are_found_and_nothing_else():
    torch.manual_seed(0)
    critic = INCritic()
    batch = torch.rand(6, 3, 16, 16) * 2 - 1
    assert independent(critic, batch, _names(critic)) == {"critic.main.0.bias", "critic.main.3.bias"}


def test_a_hand_written_centring_and_batch_norm_are_found_too():
    torch.manual_seed(0)
    critic = HandNormCritic()
    found = independent(critic, torch.randn(4, 3, 8, 8), _names(critic))
    assert found == {"critic.conv.bias", "critic.fc.bias"}


def test_only_the_names_asked_about_are_tested():
    critic = INCritic()
    assert independent(critic, torch.randn(4, 3, 16, 16), ["critic.main.3.bias", "critic.out.weight",
                                                           "generator.x"]) == {"critic.main.3.bias"}


def test_the_model_its_buffers_and_every_generator_are_left_as_they_were():
    torch.manual_seed(0)
    critic = HandNormCritic().eval()
    state = {k: v.clone() for k, v in critic.state_dict().items()}
    batch = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    independent(critic, batch, _names(critic))
    assert not critic.training
    assert all(torch.equal(v, state[k]) for k, v in critic.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_it_claims_nothing_when_it_cannot_run_the_critic():
    class Fp32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 1)

        def forward(self, x):
            if x.dtype != torch.float32:
                raise TypeError("this critic only takes fp32")
            return self.l(x)

    critic = Fp32Only()
    assert independent(critic, torch.randn(4, 4), _names(critic)) == frozenset()
    assert independent(critic, None, _names(critic)) == frozenset()


def test_a_bias_deep_in_a_critic_whose_activations_explode_still_counts():
    # With weights ~ N(0, 1) the activations grow ~30x per layer: the last biases move the output by
    # 1e-11 of its size and less, far below any fixed share, but in proportion to the move.
    torch.manual_seed(0)
    layers, c_in = [], 3
    for c in (32, 32, 64, 64, 128, 128):
        layers += [nn.Conv2d(c_in, c, 3, 1, 1), nn.LeakyReLU(0.2)]
        c_in = c
    critic = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 8 * 8, 1))
    for m in critic.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 1.0)
    names = [f"critic.{n}" for n, _ in critic.named_parameters() if n.endswith("bias")]
    assert independent(critic, torch.rand(4, 3, 8, 8) * 2 - 1, names) == frozenset()


def test_one_diagnose_tests_each_parameter_once_for_all_its_precisions(monkeypatch):
    # The answer belongs to the fp32 critic, so fp16 and bf16 share it: each test costs two fp64 forwards.
    from pathlib import Path

    import nanprobe
    from nanprobe.analysis import diagnosis, invariance

    calls, effects = [], []
    real_independent, real_measure = invariance.independent, diagnosis.measure

    def counted(critic, batch, names, root="critic"):
        calls.append(list(names))
        return real_independent(critic, batch, names, root)

    def measured(*args, **kwargs):
        effects.append(real_measure(*args, **kwargs))
        return effects[-1]

    monkeypatch.setattr(invariance, "independent", counted)
    monkeypatch.setattr(diagnosis, "measure", measured)
    case = Path(__file__).parents[1] / "zoo" / "cases" / "healthy_instancenorm_bias.yaml"
    report = nanprobe.diagnose(case)
    assert [e.precision.value for e in effects] == ["fp16", "bf16"]
    biases = {f"critic.main_module.{i}.bias" for i in (0, 3, 6)}
    assert all(set(e.independent) >= biases for e in effects)  # both precisions judged without them
    assert len(calls) == 1 and set(calls[0]) >= biases  # but the critic was moved once
    assert [r.status.value for r in report.runs] == ["ok", "ok", "ok"]
