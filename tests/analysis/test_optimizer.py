"""The optimizer phase: ops named with their parameter, Adam's eps in fp16, lost updates, divergence over steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nanprobe
from nanprobe.cli import app
from nanprobe.engine import updates
from nanprobe.engine.replay import replay
from nanprobe.enums import Phase, Precision
from nanprobe.io import config as cfg
from nanprobe.io import loading
from nanprobe.thresholds import LOST_UPDATE_SHARE
from tests.conftest import base_doc, merge

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
runner = CliRunner()
WIDE = {"COLUMNS": "200"}


def _cli(config: Path, tmp: Path, *args: str) -> tuple[str, dict, int]:
    out = tmp / f"{config.stem}.json"
    result = runner.invoke(app, ["diagnose", str(config), "--json", str(out), *args], env=WIDE)
    assert result.exit_code in (0, 1), result.output
    return result.output, json.loads(out.read_text()), result.exit_code


@pytest.fixture(scope="module")
def adam_eps(tmp_path_factory):
    return _cli(CONFIGS / "adam_eps_half.yaml", tmp_path_factory.mktemp("adam"))


@pytest.fixture(scope="module")
def lost_bf16(tmp_path_factory):
    return _cli(CONFIGS / "lost_updates_bf16.yaml", tmp_path_factory.mktemp("lost"))


@pytest.fixture(scope="module")
def divergence(tmp_path_factory):
    return _cli(CONFIGS / "high_lr_divergence.yaml", tmp_path_factory.mktemp("lr"))


def _runs(doc: dict) -> dict:
    return {r["precision"]: r for r in doc["runs"]}


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_every_optimizer_op_names_the_parameter_it_updates(optimizer):
    doc = merge(base_doc(), {"train": {"optimizer": optimizer, "weight_decay": 0.01, "eps": 1e-3, "steps": 2},
                             "precision": {"mode": "half"}})
    config = cfg.from_dict(doc, base_dir=Path.cwd())
    loaded = loading.load(config)
    trace = replay(config, loaded, Precision.FP16, torch.device("cpu"))
    names = {"critic." + n for n, _ in loaded.critic.named_parameters()}
    shapes = {tuple(p.shape) for p in loaded.critic.parameters()}
    ops = [e for e in trace.events if e.phase is Phase.OPTIMIZER and e.shape in shapes]
    assert ops and {e.step for e in ops} == {0, 1}
    assert all(e.param in names and e.module == e.param.rsplit(".", 1)[0] for e in ops), \
        [(e.op, e.param) for e in ops if e.param not in names]
    # The op that finally writes each weight carries the lost-update count of that weight.
    writers = [e for e in ops if e.info and "lost_updates" in e.info]
    assert {e.info["lost_updates"]["param"] for e in writers if e.step == 0} == names
    assert all(e.param == e.info["lost_updates"]["param"] for e in writers)


def test_lost_updates_counts_weights_the_step_rounds_away():
    w16 = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.bfloat16))
    w32 = torch.nn.Parameter(torch.full((4,), 1.0))
    counts = {}
    for name, w in (("bf16", w16), ("fp32", w32)):
        opt = torch.optim.SGD([w], lr=1e-3)
        w.grad = torch.tensor([1.0, 1.0, 0.0, 10.0], dtype=w.dtype)  # updates 1e-3, 1e-3, 0, 1e-2
        before = updates.snapshot({name: w})
        opt.step()
        counts[name] = updates.lost(opt, {name: w}, before)[name]
    # bf16's half ulp at 1.0 is 2**-8 ~ 3.9e-3: the two 1e-3 updates are lost, the 1e-2 one is not.
    assert counts["bf16"] == (3, 2)
    assert counts["fp32"] == (3, 0)


def test_adam_eps_half_breaks_in_the_optimizer(adam_eps):
    text, doc, code = adam_eps
    assert code == 1
    runs = _runs(doc)
    assert runs["fp32"]["status"] == "ok"
    fp16 = runs["fp16"]
    assert fp16["status"] == "nan" and fp16["failed_step"] == 0
    issue, nonfinite = fp16["first_issue"], fp16["first_nonfinite"]
    assert (issue["phase"], issue["param"], issue["step"]) == ("optimizer", "critic.net.0.weight", 0)
    assert nonfinite["phase"] == "optimizer" and nonfinite["op"] == "aten.addcdiv_.default"
    assert nonfinite["param"] == "critic.net.0.weight" and "sqrt(v) + eps" in nonfinite["detail"]
    assert fp16["fixes"][0]["id"] in ("adam-eps", "master-weights")
    assert {"adam-eps", "master-weights"} <= {f["id"] for f in fp16["fixes"][:2]}
    assert "addcdiv_ on critic.net.0.weight" in text and "fix: master-weights" in text


def test_adam_eps_that_survives_fp16_removes_the_nan():
    report = nanprobe.diagnose(CONFIGS / "adam_eps_half.yaml", dtypes=["fp16"], steps=1, **{"train.eps": 1e-4})
    fp16 = report.runs[0]
    assert fp16.status.value != "nan" and fp16.first_nonfinite is None


def test_bf16_half_mode_loses_updates(lost_bf16):
    text, doc, code = lost_bf16
    assert code == 0  # underflow is below the default --fail-on overflow
    assert _runs(doc)["fp32"]["status"] == "ok"
    bf16 = _runs(doc)["bf16"]
    assert bf16["status"] == "underflow"
    issue = bf16["first_issue"]
    assert (issue["kind"], issue["phase"], issue["op"]) == ("underflow", "optimizer", "aten.addcdiv_.default")
    lost = issue["numbers"]["lost_updates"]
    assert lost["param"] == issue["param"] and lost["share"] >= LOST_UPDATE_SHARE
    assert lost["lost"] / lost["elements"] == pytest.approx(lost["share"], abs=1e-4)
    per_module = {u["module"]: u for u in bf16["lost_updates"]}
    assert per_module[issue["module"]]["share"] >= LOST_UPDATE_SHARE
    assert per_module[issue["module"]]["dtype"] == "bfloat16"
    assert bf16["fixes"][0]["id"] == "master-weights" and bf16["fixes"][0]["apply"] == "precision.mode: amp"
    assert len(per_module) >= 2 and all(0 < u["lost"] <= u["elements"] for u in per_module.values())
    assert "lost updates" in text and "below half an ulp" in text and "addcdiv_ on critic.net.0.weight" in text
    # The stall shows in the trend: bf16's weights barely move while fp32's do.
    fp32_norms = [m["weight_norm"] for m in _runs(doc)["fp32"]["metrics"]]
    bf16_norms = [m["weight_norm"] for m in bf16["metrics"]]
    assert abs(bf16_norms[1] - bf16_norms[0]) < abs(fp32_norms[1] - fp32_norms[0])


def test_fp32_master_weights_lose_no_updates():
    report = nanprobe.diagnose(CONFIGS / "lost_updates_bf16.yaml", dtypes=["bf16"], mode="amp", steps=1)
    bf16 = report.runs[0]
    assert bf16.lost_updates == () and bf16.status.value == "ok"


def test_high_lr_overflows_fp16_at_a_later_step(divergence):
    text, doc, code = divergence
    assert code == 1
    runs = _runs(doc)
    assert runs["fp32"]["status"] == "ok" and runs["bf16"]["status"] == "ok"
    fp16 = runs["fp16"]
    assert fp16["status"] == "overflow" and fp16["failed_step"] > 0
    assert fp16["first_issue"]["kind"] == "overflow" and fp16["first_issue"]["step"] == fp16["failed_step"]
    assert fp16["fixes"][0]["id"] == "lower-lr" and fp16["fixes"][0]["apply"] == "train.lr: 0.03"
    # The trend that led there: fp32's weights grow step after step, and the metrics carry it.
    norms = [m["weight_norm"] for m in runs["fp32"]["metrics"]]
    assert len(norms) == 4 and all(b > a for a, b in zip(norms, norms[1:])) and norms[-1] > 2 * norms[0]
    assert f"step {fp16['failed_step']}" in text and "weight norm" in text and "fails at" in text


def test_high_lr_config_is_fine_at_a_sane_rate():
    report = nanprobe.diagnose(CONFIGS / "high_lr_divergence.yaml", **{"train.lr": 0.03})
    assert [r.status.value for r in report.runs] == ["ok", "ok", "ok"]
    fp16 = next(r for r in report.runs if r.precision is Precision.FP16)
    assert len(fp16.metrics) == 4 and fp16.scale_collapse is None and fp16.failed_step is None
    assert fp16.skipped  # its first step is skipped at scale 65536 and recovers: normal, not a finding


def test_default_is_five_critic_steps():
    assert cfg.TrainConfig().steps == 5
