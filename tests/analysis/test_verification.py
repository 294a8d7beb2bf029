"""--verify-fix: each suggested fix replayed with only its config change, marked verified or not."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nanprobe
from nanprobe.analysis import verification
from nanprobe.analysis.initialisation import he_ratios
from nanprobe.cli import app
from nanprobe.engine import replay as rp
from nanprobe.engine.reinit import reinitialise
from nanprobe.enums import FixCheck, Precision
from nanprobe.io import config as cfg
from nanprobe.io.loading import load
from nanprobe.model.report import FixSuggestion
from tests.conftest import FIXTURES, TINY, base_doc, checksums, load_fixture_module, merge, ref

VERIFY = FIXTURES / "verify_models.py"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
runner = CliRunner()


def quiet_doc(**patch) -> dict:
    """QuietCritic's penalty underflows in fp16 (fp32 only as the reference): gp-fp32 cures it."""
    return merge(base_doc(), merge({"model": {"critic": ref("QuietCritic", VERIFY)},
                                    "data": {"batch_size": 4}, "precision": {"dtypes": ["fp32", "fp16"]}}, patch))


def loud_doc(**patch) -> dict:
    """LoudCritic's last conv passes fp16's max in the forward; no penalty, so only that overflow counts."""
    return merge(base_doc(), merge({"model": {"critic": ref("LoudCritic", VERIFY)}, "loss": {"gp_weight": 0.0},
                                    "data": {"batch_size": 4}, "precision": {"dtypes": ["fp32", "fp16"]}}, patch))


def fixes_of(doc: dict) -> dict:
    fp16 = next(r for r in doc["runs"] if r["precision"] == "fp16")
    return {f["id"]: f for f in fp16["fixes"]}, [f["id"] for f in fp16["fixes"]]


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """One CLI run with --verify-fix on the quiet critic: (result, JSON, checksums before, after)."""
    folder = tmp_path_factory.mktemp("quiet")
    path = folder / "config.yaml"
    path.write_text(json.dumps(quiet_doc()), encoding="utf-8")
    before = checksums(FIXTURES) | {"config.yaml": checksums(folder)["config.yaml"]}
    out = folder / "report.json"
    result = runner.invoke(app, ["diagnose", str(path), "--verify-fix", "--json", str(out)])
    after = checksums(FIXTURES) | {"config.yaml": checksums(folder)["config.yaml"]}
    return result, json.loads(out.read_text()), before, after, sorted(p.name for p in folder.iterdir())


def test_a_fix_that_cures_the_run_is_verified(quiet):
    result, doc, *_ = quiet
    assert result.exit_code == 0, result.output  # fp16 underflows, below the default --fail-on overflow
    fixes, order = fixes_of(doc)
    gp = fixes["gp-fp32"]
    assert gp["verified"] is True and gp["overrides"] == {"loss.gp_precision": "fp32"}
    assert gp["verification"] == ("with loss.gp_precision: fp32: fp16 is now ok "
                                  "(cpu, fp16 amp with CUDA's autocast lists, 1 step, seed 0)")
    assert gp["check"] == "ok" and gp["remaining"] is None
    assert gp["verified_against"] == "cpu, fp16 amp with CUDA's autocast lists, 1 step, seed 0"
    assert order[0] == "gp-fp32"
    assert "✓ gp-fp32" in result.output and "fp16 is now ok" in result.output


def test_a_fix_that_is_applied_but_fails_says_what_it_fails_with(quiet):
    result, doc, *_ = quiet
    fixes, _ = fixes_of(doc)
    # Since underflow is judged by its effect, every replayed fix on this critic may pass: the format is
    # checked on those that fail, if any.
    failed = [f for f in fixes.values() if f["check"] == "fails"]
    for f in failed:
        assert f["verification"].startswith(f"with {f['apply']}: fp16 still fails (") and f["remaining"]
        assert f["verified"] is False
        assert " in " in f["verification"] and ", step 0" in f["verification"]
        assert f"✗ {f['id']}" in result.output


def test_fixes_past_the_limit_are_not_replayed_and_say_why(quiet):
    _, doc, *_ = quiet
    fixes, order = fixes_of(doc)
    replayed = [f for f in fixes.values() if f["verified"] is not None]
    # grad-scaler makes the same change as gp-scaled (train.grad_scaler: true): its replay is shared, not counted.
    assert len({json.dumps(f["overrides"]) for f in replayed}) == verification.MAX_VERIFIED
    assert fixes["grad-scaler"]["verification"] == fixes["gp-scaled"]["verification"]
    rest = [f for f in fixes.values() if f["verified"] is None]
    assert rest and all(f["verification"].startswith("not replayed: only the first 3 fixes that need a new replay")
                        for f in rest)


def test_verified_fixes_rank_first_then_unverified_then_failed(quiet):
    _, doc, *_ = quiet
    fixes, order = fixes_of(doc)
    groups = [{"ok": 0, "improves": 1, "untried": 2, "fails": 3}[fixes[i]["check"]] for i in order]
    assert groups == sorted(groups) and groups[0] == 0


def test_verify_fix_writes_nothing_but_the_json(quiet):
    _, _, before, after, files = quiet
    assert before == after
    assert files == ["config.yaml", "report.json"]


def test_rank_orders_by_verdict_and_keeps_the_catalogue_order_within():
    fixes = [FixSuggestion(i, "", "", "", check=v) for i, v in
             (("a", FixCheck.FAILS), ("b", FixCheck.UNTRIED), ("c", FixCheck.OK), ("d", FixCheck.IMPROVES),
              ("e", FixCheck.OK), ("f", FixCheck.UNTRIED))]
    assert [f.id for f in verification.rank(fixes)] == ["c", "e", "d", "b", "f", "a"]


def test_without_verify_fix_no_fix_is_replayed_or_marked():
    report = nanprobe.diagnose(cfg.from_dict(quiet_doc()))
    fp16 = report.runs[1]
    assert fp16.status.value != "ok" and fp16.fixes
    assert all(f.verified is None and f.verification is None for f in fp16.fixes)
    assert fp16.fixes[0].overrides == {"loss.gp_precision": "fp32"}


def test_a_custom_steps_loss_fixes_are_replayed_as_patches_of_its_code():
    doc = quiet_doc(loss={"step": str(CONFIGS / "train.py") + ":critic_step"})
    report = nanprobe.diagnose(cfg.from_dict(doc), verify_fix=True, verify_top=1)
    fixes = {f.id: f for f in report.runs[1].fixes}
    gp = fixes["gp-fp32"]
    # A config change to the loss cannot reach the user's step: the patch of their file is what is replayed.
    assert gp.apply is None and gp.overrides == {}
    assert gp.patch.startswith("--- a/configs/train.py\n+++ b/configs/train.py\n")
    assert gp.check is not FixCheck.UNTRIED and gp.verification.startswith("with the patch to configs/train.py")
    assert sum(f.check is not FixCheck.UNTRIED for f in fixes.values()) == 1  # verify_top=1: one replayed fix


def test_a_module_outside_autocast_cures_its_overflow_and_is_verified():
    doc = loud_doc(precision={"dtypes": ["fp32", "fp16", "bf16"]})
    report = nanprobe.diagnose(cfg.from_dict(doc), verify_fix=True, verify_top=2)
    fp16 = report.runs[1]
    assert fp16.first_issue.kind.value == "overflow" and fp16.first_issue.module == "critic.net.2"
    fixes = {f.id: f for f in fp16.fixes}
    assert fixes["fp32-module"].overrides == {"precision.fp32_modules": ["critic.net.2"]}
    assert fixes["fp32-module"].apply == "precision.fp32_modules: [critic.net.2]"
    assert fixes["fp32-module"].verified is True, fixes["fp32-module"].verification
    assert fixes["init"].overrides == {"model.init": "he"}
    assert fixes["init"].check in (FixCheck.OK, FixCheck.IMPROVES), fixes["init"].verification
    # bf16 was replayed by the diagnosis itself: verifying it is free and does not count against verify_top.
    assert fixes["bf16"].verified is True
    assert fixes["bf16"].verification == ("with precision.dtypes: [bf16]: bf16 is now ok "
                                          "(cpu, bf16 amp with CUDA's autocast lists, 1 step, seed 0)")


# ---- precision.fp32_modules and model.init


def _events(doc: dict, precision: Precision):
    config = cfg.from_dict(doc)
    trace = rp.replay(config, load(config), precision, torch.device("cpu"))
    return [e for e in trace.events if e.phase.value == "forward" and e.op == "aten.convolution.default"]


@pytest.mark.parametrize("mode,low", [("amp", "float16"), ("half", "float16")])
def test_fp32_modules_run_in_fp32_while_the_rest_stays_low(mode, low):
    doc = merge(base_doc(), {"precision": {"mode": mode, "fp32_modules": ["critic.net.0"]}, "loss": {"gp_weight": 0.0}})
    convs = {e.module: e.dtype for e in _events(doc, Precision.FP16)}
    assert convs == {"critic.net.0": "float32", "critic.net.2": low}


def test_loud_critic_overflows_without_fp32_module_and_not_with_it():
    off = nanprobe.diagnose(cfg.from_dict(loud_doc()), dtypes=["fp16"])
    on = nanprobe.diagnose(cfg.from_dict(loud_doc(precision={"fp32_modules": ["critic.net.2"]})), dtypes=["fp16"])
    assert off.runs[0].first_issue.kind.value == "overflow" and off.runs[0].first_issue.module == "critic.net.2"
    assert on.runs[0].status.value == "ok"


@pytest.mark.parametrize("patch,message", [
    ({"precision": {"fp32_modules": ["critic.nett.2"]}},
     "precision.fp32_modules: there is no module 'critic.nett.2'; did you mean 'critic.net.2'?"),
    ({"precision": {"fp32_modules": ["net.2"]}},
     "precision.fp32_modules: 'net.2' must be a module path starting with critic or generator, e.g. critic.net.6"),
    ({"precision": {"fp32_modules": 3}}, "precision.fp32_modules: expected a list of module paths"),
    ({"model": {"init": "xavier"}}, "model.init: must be one of default, he, got 'xavier'"),
    ({"model": {"inti": "he"}}, "unknown key 'model.inti'; did you mean 'init'?"),
])
def test_bad_fp32_modules_and_init_are_one_line_and_exit_2(write_config, patch, message):
    path = write_config(merge(base_doc(), patch))
    result = runner.invoke(app, ["diagnose", str(path), "-q"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanprobe: error: " + message), result.output


def test_init_he_redraws_a_copy_at_the_he_scale():
    tiny = load_fixture_module(TINY)
    critic = tiny.TinyCritic(ch=64)
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(30.0)
    snapshot = {k: v.clone() for k, v in critic.state_dict().items()}
    import copy

    fresh = reinitialise(copy.deepcopy(critic), "he", seed=0)
    assert all(torch.equal(v, critic.state_dict()[k]) for k, v in snapshot.items())
    ratios = he_ratios(fresh)
    # kaiming_normal_(a=0.2) on every layer, as the init fix's snippet does: the He scale for the layers
    # followed by LeakyReLU(0.2); the last, linear one gets the same gain (1.39x its linear He value at most).
    assert 0.9 < ratios["critic.net.0"] < 1.1 and all(0.9 < r < 1.5 for r in ratios.values()), ratios
    assert all(not m.bias.detach().any() for m in fresh.net if isinstance(m, torch.nn.Conv2d))
    again = reinitialise(copy.deepcopy(critic), "he", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters()))
    assert reinitialise(critic, "default", seed=0) is critic


def test_the_users_module_objects_are_untouched():
    verify_models = load_fixture_module(VERIFY, "_nanprobe_test_verify_models")
    critic = verify_models.LoudCritic()
    critic.eval()
    snapshot = {k: v.clone() for k, v in critic.state_dict().items()}
    doc = loud_doc(model={"init": "he"}, precision={"fp32_modules": ["critic.net.2"]})
    doc["model"]["critic"] = critic
    nanprobe.diagnose(cfg.from_dict(doc), verify_fix=True, dtypes=["fp32", "fp16"])
    assert all(torch.equal(v, critic.state_dict()[k]) for k, v in snapshot.items())
    assert all(v.dtype == torch.float32 for v in critic.state_dict().values())
    for m in critic.modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
    assert not critic.training


def test_the_penalty_example_is_cured_by_gp_fp32():
    report = nanprobe.diagnose(CONFIGS / "wgan_gp_fp16_underflow.yaml", dtypes=["fp16"], verify_fix=True, verify_top=1)
    (fp16,) = report.runs
    gp = next(f for f in fp16.fixes if f.id == "gp-fp32")
    # The NaN is gone; the deep critic's parameter gradients still underflow without a GradScaler: milder, not cured.
    assert (gp.check, gp.verified) == (FixCheck.IMPROVES, False), gp.verification
    assert gp.remaining.startswith("underflow: underflow in backward at critic.net.")
    assert gp.verification.startswith("with loss.gp_precision: fp32: improves: fp16 was nan and no longer fails "
                                      "--fail-on overflow; underflow: underflow in backward at critic.net.")


def test_verify_top_must_be_positive(write_config):
    result = runner.invoke(app, ["diagnose", str(write_config()), "--verify-fix", "--verify-top", "0"])
    assert result.exit_code == 2 and "--verify-top" in result.output
