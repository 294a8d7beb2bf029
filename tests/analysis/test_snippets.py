"""The fixes' code fits the user: their hyper-parameters exactly as configured, their loss kind, a
device-neutral autocast (never the replay's device), and code that wraps instead of being cut."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from nanprobe.analysis.diagnosis import fix_settings
from nanprobe.analysis.fixes import FixContext, adapted
from nanprobe.enums import FindingKind, FixCheck, Mode, Phase, Precision, Status
from nanprobe.formats import table
from nanprobe.io import config as cfg
from nanprobe.model.report import Finding, FixSuggestion, Report, RunReport

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def snippets(config: cfg.Config, precision: Precision = Precision.FP16) -> dict:
    # The replay ran on the CPU: the snippets must not say so.
    ctx = FixContext(precision=precision, mode=config.precision.mode, status=Status.NAN, issue=None, nonfinite=None,
                     **fix_settings(config, {}, "cpu"))
    return {f.id: f.snippet for f in adapted(ctx)}


def odd_config(**train) -> cfg.Config:
    doc = {"model": {"critic": f"{CONFIGS / 'models.py'}:DCGANCritic"}, "loss": {"kind": "r1", "gp_weight": 5.0},
           "train": {"optimizer": "adamw", "lr": 3e-4, "betas": [0.0, 0.9905854], "eps": 1e-6, "weight_decay": 0.05,
                     **train}, "device": "cpu"}
    return cfg.from_dict(doc)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_no_shipped_examples_snippet_names_the_replays_device(path):
    config = cfg.load(path)
    for precision in (Precision.FP16, Precision.BF16):
        for fix_id, code in snippets(config, precision).items():
            assert '"cpu"' not in code and "'cpu'" not in code, (fix_id, code)
            assert '"cuda"' not in code, (fix_id, code)


@pytest.mark.parametrize("path", [*SHIPPED, None], ids=[p.stem for p in SHIPPED] + ["adamw-r1"])
def test_snippets_carry_the_configured_hyper_parameters_exactly(path):
    config = cfg.load(path) if path is not None else odd_config()
    t = config.train
    for fix_id, code in snippets(config).items():
        for lr in re.findall(r"\blr=([^,)\s]+)", code):
            want = t.lr / 10 if fix_id == "lower-lr" else t.lr  # lower-lr changes lr on purpose
            assert float(lr) == want, (fix_id, code)
        for b0, b1 in re.findall(r"betas=\(([^,]+), ([^)]+)\)", code):
            assert (b0, b1) == (repr(float(t.betas[0])), repr(float(t.betas[1]))), (fix_id, code)
        for eps in re.findall(r"\beps=([^,)\s]+)", code):
            assert float(eps) == (1e-4 if fix_id == "adam-eps" else t.eps), (fix_id, code)
        for wd in re.findall(r"weight_decay=([^,)\s]+)", code):
            assert float(wd) == t.weight_decay, (fix_id, code)
        if config.loss.step is None:
            for weight in re.findall(r"(?:gp|r1) = ([0-9.e+-]+) ", code):
                assert float(weight) == config.loss.gp_weight, (fix_id, code)


def test_adam_betas_are_printed_as_configured_and_eps_is_kept():
    code = snippets(odd_config())
    assert "betas=(0.0, 0.9905854)" in code["master-weights"]
    assert code["adam-eps"] == ("opt = torch.optim.AdamW(critic.parameters(), lr=0.0003, betas=(0.0, 0.9905854), "
                                "eps=0.0001, weight_decay=0.05)")


def test_r1_is_not_given_the_wgan_gp_interpolation():
    code = snippets(odd_config())
    for fix_id in ("gp-fp32", "gp-scaled"):
        assert "alpha" not in code[fix_id] and "x_hat" not in code[fix_id], code[fix_id]
    assert "r1 = 5.0 / 2 * grads.flatten(1).pow(2).sum(1).mean()" in code["gp-fp32"]
    assert "with torch.autocast(device_type=real.device.type, enabled=False):" in code["gp-fp32"]


def test_a_custom_step_is_called_by_its_own_name():
    config = cfg.load(CONFIGS / "custom_step.yaml")
    code = snippets(config)
    assert "loss = critic_step(critic, generator, real, z)" in code["grad-scaler"]
    assert "critic_loss" not in "".join(code.values())


# ---- code is never cut


def _report(fix: FixSuggestion) -> Report:
    issue = Finding(FindingKind.NAN, "aten.div.Tensor", "", Phase.BACKWARD, 0, "train.py:24", "8 -inf of 8 values")
    run = RunReport(Precision.FP16, Mode.AMP, Status.NAN, True, issue, issue, fixes=(fix,))
    return Report("config.yaml", "cpu", "2.13.0", (run,))


LONG = ("grad_norm = torch.sqrt(torch.sum(gradients_of_the_interpolated_images_for_the_penalty ** 2, dim=1) "
        "+ 1e-4)  # an eps that survives fp16")
PATCH = ("--- a/train.py\n+++ b/train.py\n@@ -1,1 +1,1 @@\n"
         "-    grad_norm = torch.sqrt(torch.sum(gradients_of_the_interpolated_images_for_the_penalty ** 2, dim=1))\n"
         f"+    {LONG}\n")


def _flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


@pytest.mark.parametrize("width", [40, 80, 200])
@pytest.mark.parametrize("patch", [None, PATCH])
def test_a_snippet_or_patch_is_wrapped_never_cut(width, patch):
    fix = FixSuggestion("safe-norm", "Compute the gradient norm so its derivative is finite at 0", "why", LONG,
                        patch=patch, check=FixCheck.OK, verified=True, verification="with the patch: ok")
    out = io.StringIO()  # not a terminal: what a pipe gets
    table.report(_report(fix), Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    for line in (patch or LONG).splitlines():
        assert _flat(line) in _flat(text), (width, line)
    assert max(len(x) for x in text.splitlines()) <= width


def test_the_terminal_marks_what_the_replay_found():
    fixes = [FixSuggestion("gp-fp32", "t", "w", "s", check=FixCheck.OK, verified=True, verification="ok"),
             FixSuggestion("safe-norm", "t", "w", "s", check=FixCheck.IMPROVES, verified=False, verification="milder",
                           remaining="underflow: ..."),
             FixSuggestion("bf16", "t", "w", "s", check=FixCheck.UNTRIED, verification="not replayed"),
             FixSuggestion("init", "t", "w", "s", check=FixCheck.FAILS, verified=False, verification="still fails")]
    rep = _report(fixes[0])
    from dataclasses import replace

    rep = replace(rep, runs=(replace(rep.runs[0], fixes=tuple(fixes)),))
    out = io.StringIO()
    table.report(rep, Console(file=out, width=120, color_system=None))
    text = out.getvalue()
    assert "fix: ✓ gp-fp32" in text and "~ improves safe-norm" in text
    assert "? bf16" in text and "✗ init" in text


def test_master_weights_scales_the_loss_in_fp16_only():
    """fp32 weights under fp16 autocast still flush small gradients without a GradScaler; bf16 has fp32's range."""
    assert "scaler.scale(loss).backward()" in snippets(odd_config(), Precision.FP16)["master-weights"]
    assert "scaler" not in snippets(odd_config(), Precision.BF16)["master-weights"]
