"""CLI error handling: every bad input is one `nanprobe: error: ...` line on stderr and exit code 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from nanprobe.cli import app
from tests.conftest import BROKEN, EXITS, TINY, base_doc, checksums, line_of, merge, ref

runner = CliRunner()


@dataclass
class Env:
    tmp: Path
    write: Callable[..., Path]
    tiny: object

    def config(self, name: str = "config.yaml", **patch) -> list[str]:
        """argv for `nanprobe diagnose` on the base config with patch merged in."""
        return ["diagnose", str(self.write(name=name, **patch))]

    def text(self, text: str) -> list[str]:
        return ["diagnose", str(self.write(text))]

    def checkpoint(self, obj, name: str = "ckpt.pt", **patch) -> list[str]:
        path = self.tmp / name
        torch.save(obj, path)
        return self.config(**merge({"model": {"checkpoint": str(path)}}, patch))

    def npy(self, array: np.ndarray, name: str = "data.npy", **patch) -> list[str]:
        path = self.tmp / name
        np.save(path, array)
        return self.config(**merge({"data": {"source": "file", "path": str(path)}}, patch))

    def pt(self, obj, name: str = "data.pt", **patch) -> list[str]:
        path = self.tmp / name
        torch.save(obj, path)
        return self.config(**merge({"data": {"source": "file", "path": str(path)}}, patch))

    def junk(self, name: str) -> Path:
        path = self.tmp / name
        path.write_bytes(b"this is not what the suffix says it is")
        return path

    def critic_state(self) -> dict:
        return self.tiny.TinyCritic().state_dict()


class Pickled:
    """Not a tensor, not a container: torch.load(weights_only=True) refuses it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def _missing_keys(env: Env):
    sd = env.critic_state()
    sd.pop("net.2.bias")
    return env.checkpoint(sd)


def _unexpected_keys(env: Env):
    sd = env.critic_state()
    sd["net.9.weight"] = torch.zeros(1)
    return env.checkpoint({"critic": sd})


def _wrong_shapes(env: Env):
    sd = env.tiny.TinyCritic(ch=8).state_dict()
    return env.checkpoint({"critic": sd, "generator": env.tiny.TinyGenerator().state_dict()})


def _step(name: str):
    return lambda env: env.config(loss={"step": ref(name)})


def _no_cuda(env: Env):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    return env.config(device="cuda")


USAGE = "<click usage error>"  # first expected item: typer/click rejected the option before nanprobe ran

# (id, setup(env) -> argv, substrings the one error line must contain)
CASES: list[tuple[str, Callable[[Env], list[str]], list[str]]] = [
    ("missing-config", lambda env: ["diagnose", str(env.tmp / "nope.yaml")],
     ["config file not found", "nope.yaml"]),
    ("config-name-too-long", lambda env: ["diagnose", str(env.tmp / ("c" * 300 + ".yaml"))],
     ["cannot read config file", "File name too long"]),
    ("config-is-folder", lambda env: ["diagnose", str(env.tmp)], ["is a folder"]),
    ("empty-file", lambda env: env.text(""), ["config.yaml is empty", "model.critic"]),
    ("comments-only-file", lambda env: env.text("# nothing here\n"), ["is empty"]),
    ("yaml-syntax-error", lambda env: env.text("model:\n  critic: a.py:C\n  critic_args: {img: 32\ndata: {}\n"),
     ["invalid YAML at line 4, column 5", "(while parsing a flow mapping that starts at line 3, column 16)"]),
    ("yaml-not-a-mapping", lambda env: env.text("- model\n- data\n"), ["must be a YAML mapping", "got list"]),
    ("unknown-top-level-key", lambda env: env.config(modle={"critic": "x.py:C"}),
     ["unknown key 'modle'", "did you mean 'model'?"]),
    ("unknown-nested-key", lambda env: env.config(data={"batchsize": 4}),
     ["unknown key 'data.batchsize'", "did you mean 'batch_size'?"]),
    ("section-not-a-mapping", lambda env: env.config(train=[1, 2]), ["train: expected a mapping"]),
    ("wrong-type-batch-size", lambda env: env.config(data={"batch_size": "x"}),
     ["data.batch_size: expected an integer, got 'x' (str)"]),
    ("negative-batch-size", lambda env: env.config(data={"batch_size": -4}),
     ["data.batch_size: must be >= 1, got -4"]),
    ("bad-enum-loss-kind", lambda env: env.config(loss={"kind": "wgangp"}),
     ["loss.kind: must be one of", "did you mean 'wgan-gp'?"]),
    ("number-too-large", lambda env: env.text(f"model: {{critic: 'a.py:C'}}\ntrain: {{lr: {10**400}}}\n"),
     ["train.lr: expected a finite number"]),
    ("bad-betas", lambda env: env.config(train={"betas": [0.5, 1.5]}), ["train.betas: each beta must be in [0, 1)"]),
    ("bad-range", lambda env: env.config(data={"range": [1, -1]}), ["data.range: the low end must be below"]),
    ("empty-dtype-list", lambda env: env.config(precision={"dtypes": []}),
     ["precision.dtypes: expected a non-empty list"]),
    ("bad-dtype-name", lambda env: env.config(precision={"dtypes": ["fp64"]}),
     ["precision.dtypes: must be one of fp32, fp16, bf16, got 'fp64'"]),
    ("critic-missing", lambda env: env.config(model={"critic": None}), ["model.critic is missing"]),
    ("critic-ref-without-colon", lambda env: env.config(model={"critic": "tiny_models.py"}),
     ["model.critic: 'tiny_models.py' must be 'file.py:Name'"]),
    ("missing-model-file", lambda env: env.config(model={"critic": str(env.tmp / "nope.py") + ":Critic"}),
     ["model.critic: file not found", "nope.py"]),
    ("missing-module", lambda env: env.config(model={"critic": "no_such_pkg_xyz.models:Critic"}),
     ["no module named 'no_such_pkg_xyz.models'"]),
    ("missing-attribute", lambda env: env.config(model={"critic": ref("Critc")}),
     ["has no attribute 'Critc'", "it defines", "TinyCritic", "make_critic"]),
    ("import-error-in-user-file", lambda env: env.config(model={"critic": ref("Critic", BROKEN)}),
     ["importing broken_import.py raised ImportError", f"broken_import.py:{line_of(BROKEN, 'RAISE-AT-IMPORT')})"]),
    ("class-init-raises", lambda env: env.config(model={"critic": ref("RaisingCritic")}),
     ["building RaisingCritic raised RuntimeError: RaisingCritic refuses to build",
      f"tiny_models.py:{line_of(TINY, 'RAISE-IN-INIT')})"]),
    ("factory-raises", lambda env: env.config(model={"critic": ref("raising_factory")}),
     ["building raising_factory raised ValueError: the factory broke",
      f"tiny_models.py:{line_of(TINY, 'RAISE-IN-FACTORY')})"]),
    ("factory-bad-args", lambda env: env.config(model={"critic": ref("make_critic"), "critic_args": {"chan": 4}}),
     ["model.critic: calling make_critic(**model.critic_args) failed", "chan"]),
    ("typeerror-inside-init", lambda env: env.config(model={"critic": ref("TypeErrorCritic")}),
     ["building TypeErrorCritic raised TypeError", f"tiny_models.py:{line_of(TINY, 'RAISE-TYPEERROR-IN-INIT')})"]),
    ("sys-exit-at-import", lambda env: env.config(model={"critic": ref("Critic", EXITS)}),
     ["importing exits_at_import.py called sys.exit(3)", f"exits_at_import.py:{line_of(EXITS, 'EXIT-AT-IMPORT')})",
      "if __name__ == '__main__'"]),
    ("critic-returns-dict", lambda env: env.config(model={"critic": ref("NoScoreCritic")}),
     ["model.critic: returns dict; it must return a tensor of scores"]),
    ("not-an-nn-module", lambda env: env.config(model={"critic": ref("not_a_module")}),
     ["model.critic: not_a_module returned a list, not an nn.Module"]),
    ("not-callable", lambda env: env.config(model={"critic": ref("NOT_CALLABLE")}),
     ["is a int, not a class or factory"]),
    ("checkpoint-missing-file", lambda env: env.config(model={"checkpoint": str(env.tmp / "nope.pt")}),
     ["model.checkpoint: file not found"]),
    ("checkpoint-missing-keys", _missing_keys, ["does not fit the critic", "missing keys net.2.bias"]),
    ("checkpoint-unexpected-keys", _unexpected_keys, ["does not fit the critic", "unexpected keys net.9.weight"]),
    ("checkpoint-wrong-shapes", _wrong_shapes,
     ["does not fit the critic", "wrong shapes net.0.weight (8, 3, 4, 4) vs (4, 3, 4, 4)", "(checkpoint vs model)"]),
    ("checkpoint-list-of-tensors", lambda env: env.checkpoint([torch.zeros(2), torch.ones(3)]),
     ["model.checkpoint: ckpt.pt holds a list, not a state_dict"]),
    ("checkpoint-refused-pickle", lambda env: env.checkpoint({"critic": Pickled()}),
     ["model.checkpoint: ckpt.pt holds objects that torch.load(weights_only=True) refused",
      "import tests.test_cli_errors.Pickled", "no code from it was run", "save the state_dicts only"]),
    ("checkpoint-garbage", lambda env: env.config(model={"checkpoint": str(env.junk("junk.pt"))}),
     ["model.checkpoint: cannot read junk.pt", "is it a file written by torch.save?"]),
    ("checkpoint-entry-not-tensors", lambda env: env.checkpoint({"critic": {"net.0.weight": [1.0]}}),
     ["the 'critic' entry of ckpt.pt is not a state_dict of tensors"]),
    ("checkpoint-nested-under-other-key",
     lambda env: env.checkpoint({"model": env.critic_state(), "epoch": torch.tensor(3)}),
     ["ckpt.pt is not a state_dict of tensors (not tensors: model)", "{'critic': critic.state_dict()"]),
    ("checkpoint-generator-does-not-fit",
     lambda env: env.checkpoint({"critic": env.critic_state(),
                                 "generator": env.tiny.TinyGenerator(latent_dim=4).state_dict()}),
     ["ckpt.pt does not fit the generator", "wrong shapes fc.weight (192, 4) vs (192, 8)"]),
    ("data-source-file-without-path", lambda env: env.config(data={"source": "file"}), ["data.path is missing"]),
    ("data-path-with-synthetic", lambda env: env.config(data={"path": "x.npy"}), ["data.path is set but data.source"]),
    ("data-file-missing", lambda env: env.config(data={"source": "file", "path": str(env.tmp / "nope.npy")}),
     ["data.path: file not found", "nope.npy"]),
    ("data-wrong-rank", lambda env: env.npy(np.zeros((4, 3), np.float32)),
     ["data.path: data.npy has shape [4, 3]; expected [N, C, H, W]"]),
    ("data-shape-mismatch", lambda env: env.npy(np.zeros((4, 3, 16, 16), np.float32)),
     ["data.shape: [3, 8, 8] does not match data.npy, whose samples are [3, 16, 16]"]),
    ("data-no-samples", lambda env: env.npy(np.zeros((0, 3, 8, 8), np.float32)), ["holds no samples"]),
    ("data-bool-dtype", lambda env: env.npy(np.zeros((4, 3, 8, 8), bool)), ["has dtype bool"]),
    ("data-pt-refused-pickle", lambda env: env.pt({"x": Pickled()}),
     ["data.path: data.pt holds objects that torch.load(weights_only=True) refused", "no code from it was run"]),
    ("data-pt-list", lambda env: env.pt([torch.zeros(4, 3, 8, 8)]),
     ["data.path: data.pt holds a list, not a tensor [N, C, H, W]"]),
    ("data-pt-garbage", lambda env: env.config(data={"source": "file", "path": str(env.junk("data.pt"))}),
     ["data.path: cannot read data.pt", "is it a file written by torch.save?"]),
    ("data-npy-garbage", lambda env: env.config(data={"source": "file", "path": str(env.junk("data.npy"))}),
     ["data.path: cannot read data.npy: it is not a .npy array file"]),
    ("data-wrong-suffix", lambda env: (env.tmp.joinpath("data.txt").write_text("1 2 3"),
                                       env.config(data={"source": "file", "path": str(env.tmp / "data.txt")}))[1],
     ["data.path: data.txt must be a .npy or .pt file"]),
    ("step-wrong-signature", _step("wrong_signature_step"),
     ["loss.step: wrong_signature_step(critic, real) must take (critic, generator, real, z)"]),
    ("step-non-scalar", _step("non_scalar_step"),
     ["loss.step: the 'loss' it returns must be a scalar float tensor, got Tensor[2, 1]"]),
    ("step-no-loss", _step("no_loss_step"), ["loss.step: the returned dict has no 'loss' (keys: score)"]),
    ("step-raises", _step("raising_step"),
     ["the fp32 replay (step 0, forward) raised NameError", f"tiny_models.py:{line_of(TINY, 'RAISE-IN-STEP')})"]),
    ("step-not-callable", _step("NOT_CALLABLE"), ["loss.step:", "NOT_CALLABLE' is not a function"]),
    ("device-cuda-without-gpu", _no_cuda, ["device: cuda was asked for but no CUDA GPU is available"]),
    ("generator-shape-mismatch", lambda env: env.config(model={"generator": ref("WrongShapeGenerator")}),
     ["model.generator: produces samples of shape [3, 4, 4] but the data's are [3, 8, 8]"]),
    ("generator-wrong-latent-dim", lambda env: env.config(model={"latent_dim": 5}),
     ["the generator on z of shape [2, 5] (model.latent_dim) raised RuntimeError"]),
    ("critic-wrong-channels", lambda env: env.config(data={"shape": [1, 8, 8]}, model={"generator": None}),
     ["the critic on a batch of shape [2, 1, 8, 8] raised RuntimeError"]),
    ("cli-empty-dtype", lambda env: env.config() + ["--dtypes", " , "], ["--dtypes: give one or more of fp32"]),
    ("cli-bad-dtype", lambda env: env.config() + ["--dtypes", "fp64"], ["precision.dtypes: must be one of"]),
    ("cli-steps-0", lambda env: env.config() + ["--steps", "0"],
     [USAGE, "Invalid value for '--steps'", "greater than or equal to 1"]),
    ("cli-json-unwritable", lambda env: env.config() + ["--json", str(env.tmp / "no" / "such" / "dir.json")],
     ["--json: cannot write"]),
]


@pytest.fixture
def env(tmp_path, write_config, tiny) -> Env:
    return Env(tmp_path, write_config, tiny)


def test_the_table_covers_at_least_25_bad_inputs():
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("setup, expected", [pytest.param(s, e, id=i) for i, s, e in CASES])
def test_bad_input_is_one_error_line_and_exit_2(env, setup, expected):
    result = runner.invoke(app, setup(env))
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    if expected[0] == USAGE:  # typer's own check: its usage message, also exit 2
        assert result.stderr.startswith("Usage: ")
        for part in expected[1:]:
            assert part in result.stderr, result.stderr
        return
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # nothing else on stderr: no blank line, no progress bar
    line = lines[0]
    assert line.startswith("nanprobe: error: "), line
    for part in expected:
        assert part in line, line


def test_bad_input_with_quiet_is_exactly_one_line(env):
    result = runner.invoke(app, env.config(data={"batch_size": -4}) + ["--quiet"])
    assert result.exit_code == 2
    assert result.stderr == "nanprobe: error: data.batch_size: must be >= 1, got -4\n"
    assert result.stdout == ""


def test_bad_input_without_quiet_is_exactly_one_line_on_stderr(env):
    result = runner.invoke(app, env.config(data={"batch_size": -4}))
    assert result.exit_code == 2
    assert result.stderr == "nanprobe: error: data.batch_size: must be >= 1, got -4\n"


@pytest.mark.parametrize("argv, option", [
    pytest.param(["--steps", "x"], "--steps", id="steps-not-int"),
    pytest.param(["--fail-on", "sometimes"], "--fail-on", id="bad-fail-on"),
    pytest.param(["--mode", "full"], "--mode", id="bad-mode"),
    pytest.param(["--device", "tpu"], "--device", id="bad-device"),
    pytest.param(["--bogus"], "--bogus", id="unknown-option"),
])
def test_bad_option_is_a_usage_error_with_exit_2(env, argv, option):
    """typer/click check these before nanprobe runs: their usage error, exit 2, no traceback."""
    result = runner.invoke(app, env.config() + argv)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert option in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_missing_config_argument_is_a_usage_error():
    result = runner.invoke(app, ["diagnose"])
    assert result.exit_code == 2
    assert "missing argument 'config'" in result.stderr.lower()
    assert "Traceback" not in result.output


def test_help_works():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "diagnose" in result.stdout
    result = runner.invoke(app, ["diagnose", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--json", "--fail-on", "--dtypes", "--mode", "--device", "--steps", "--quiet"):
        assert option in result.stdout


def test_a_valid_config_runs_and_exits_0(env):
    result = runner.invoke(app, env.config() + ["--json", "-"])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert [run["precision"] for run in report["runs"]] == ["fp32"]
    assert "Traceback" not in result.output


def test_importing_the_cli_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, nanprobe.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_diagnose_never_writes_to_the_users_folder(tmp_path, monkeypatch, tiny):
    """A full run leaves the config, model file, checkpoint and data byte-identical, and adds no file."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(TINY, project / "models.py")
    torch.save({"critic": tiny.TinyCritic().state_dict(), "generator": tiny.TinyGenerator().state_dict()},
               project / "ckpt.pt")
    np.save(project / "data.npy", np.random.default_rng(0).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32))
    doc = merge(base_doc(), {
        "model": {"critic": "models.py:TinyCritic", "generator": "models.py:TinyGenerator", "checkpoint": "ckpt.pt"},
        "data": {"source": "file", "path": "data.npy"},
        "loss": {"step": "models.py:critic_step"},
        "train": {"steps": 2},
    })
    (project / "nanprobe.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    before = checksums(project)
    entries_before = sorted(p.name for p in project.rglob("*"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths resolve against the config's folder, not the cwd
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # the environment may set PYTHONDONTWRITEBYTECODE
    result = runner.invoke(app, ["diagnose", str(project / "nanprobe.yaml")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert checksums(project) == before
    assert sorted(p.name for p in project.rglob("*")) == entries_before
    assert list(elsewhere.iterdir()) == []


def test_dtype_is_a_hidden_alias_of_dtypes(env):
    # Older scripts pass --dtype; both commands now say --dtypes, and help shows only that.
    assert "--dtype " not in runner.invoke(app, ["diagnose", "--help"]).stdout
    alias = runner.invoke(app, env.config() + ["--dtype", "fp32", "--json", "-"])
    assert alias.exit_code == 0, alias.output
    assert [r["precision"] for r in json.loads(alias.stdout)["runs"]] == ["fp32"]
    both = runner.invoke(app, env.config() + ["--dtype", "fp32", "--dtypes", "fp32"])
    assert both.exit_code == 2 and "give it once" in both.output
