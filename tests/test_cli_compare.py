"""`nanprobe compare-precisions` on the command line: output, JSON, --plot, exit codes, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from nanprobe.cli import app
from tests.conftest import base_doc, merge, small_gan_doc

runner = CliRunner()


def write(tmp_path: Path, doc: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def gan_config(tmp_path) -> Path:
    return write(tmp_path, small_gan_doc())


def test_full_run_shows_tables_range_view_and_writes_only_the_named_paths(tmp_path, gan_config):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(app, ["compare-precisions", str(gan_config), "--top", "3",
                                 "--json", str(out / "c.json"), "--plot", str(out / "ranges.png")])
    # fp16 ends in NaN: exit 1 as diagnose does with the default --fail-on overflow.
    assert result.exit_code == 1, (result.output, result.exception)
    text = result.stdout
    assert "per precision (fp32 is the reference)" in text
    assert "fp16 departs from fp32 at critic.net." in text and "· input-grad" in text
    assert "per module: top 3 of" in text
    assert "dynamic range: log2|x|" in text
    assert "recommendation: use bf16" in text and "gp-fp32" in text
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "ranges.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]
    d = json.loads((out / "c.json").read_text(encoding="utf-8"))
    assert d["summaries"][1]["departs_at"]["phase"] == "input-grad"
    assert (out / "ranges.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_healthy_config_exits_0_and_json_to_stdout_is_only_json(tmp_path):
    doc = merge(base_doc(), {"precision": {"dtypes": ["fp32"]}, "data": {"batch_size": 4}})
    result = runner.invoke(app, ["compare-precisions", str(write(tmp_path, doc)), "--dtypes", "bf16", "--json", "-"])
    assert result.exit_code == 0, (result.output, result.exception)
    d = json.loads(result.stdout)
    assert [s["precision"] for s in d["summaries"]] == ["fp32", "bf16"]
    assert d["summaries"][1]["status"] == "ok"
    assert d["recommendation"]["use"] == "bf16" and d["recommendation"]["fp16_fix"] is None


def test_fail_on_nan_still_fails_a_nan_run(gan_config):
    result = runner.invoke(app, ["compare-precisions", str(gan_config), "--dtypes", "fp16", "--fail-on", "nan",
                                 "--quiet"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""


def test_plot_without_matplotlib_is_one_line_and_exit_2(tmp_path, gan_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = runner.invoke(app, ["compare-precisions", str(gan_config), "--plot", str(tmp_path / "r.png")])
    assert result.exit_code == 2
    assert result.stderr.strip() == ('nanprobe: error: --plot needs matplotlib, which is not installed: '
                                     'pip install "nanprobe[plot]"')
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--plot", "ranges.pdf"], "--plot: ranges.pdf is not a .png path"),
    (["--dtypes", "fp32"], "--dtypes: give fp16, bf16 or both"),
    (["--dtypes", "fp8"], "precision.dtypes"),
])
def test_bad_options_are_one_line_and_exit_2(gan_config, args, message):
    result = runner.invoke(app, ["compare-precisions", str(gan_config), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("nanprobe: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_missing_config_is_exit_2(tmp_path):
    result = runner.invoke(app, ["compare-precisions", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert result.stderr.startswith("nanprobe: error: ") and "nope.yaml" in result.stderr


def test_ctrl_c_during_a_replay_exits_130(tmp_path):
    (tmp_path / "steps.py").write_text("def step(critic, generator, real, z):\n    raise KeyboardInterrupt\n",
                                       encoding="utf-8")
    doc = merge(base_doc(), {"loss": {"step": str(tmp_path / "steps.py") + ":step"}})
    result = runner.invoke(app, ["compare-precisions", str(write(tmp_path, doc))])
    assert result.exit_code == 130
    assert "nanprobe: interrupted" in result.stderr


def test_help_lists_the_options_without_importing_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom nanprobe.cli import app\n"
            "r = CliRunner().invoke(app, ['compare-precisions', '--help'])\n"
            "print(r.exit_code, 'torch' in sys.modules)\nprint(r.stdout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    first, _, rest = out.stdout.partition("\n")
    assert first == "0 False", out.stdout + out.stderr
    for option in ("--dtypes", "--steps", "--json", "--top", "--plot", "--fail-on"):
        assert option in rest
