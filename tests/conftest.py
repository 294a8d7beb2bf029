"""Shared helpers: the tiny fixture models, a valid base config, and YAML written into tmp_path."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "tiny_models.py"
BROKEN = FIXTURES / "broken_import.py"
EXITS = FIXTURES / "exits_at_import.py"


def ref(name: str, file: Path = TINY) -> str:
    """'/abs/path/file.py:Name', the form a config uses for a model, factory or step."""
    return f"{file}:{name}"


def base_doc() -> dict:
    """A small valid config document: tiny critic and generator, 3x8x8 synthetic data, fp32 only, CPU."""
    return {
        "model": {
            "critic": ref("TinyCritic"),
            "generator": ref("TinyGenerator"),
            "latent_dim": 8,
        },
        "data": {"source": "synthetic", "shape": [3, 8, 8], "batch_size": 2},
        "loss": {"kind": "wgan-gp"},
        "train": {"steps": 1},
        "precision": {"dtypes": ["fp32"]},
        "device": "cpu",
        "seed": 0,
    }


MODELS = Path(__file__).resolve().parents[1] / "configs" / "models.py"


def small_gan_doc(**loss) -> dict:
    """A 16 px DCGAN critic at a tiny init: its input gradients (~1e-9) flush to 0 in fp16, not in bf16."""
    return {
        "model": {"critic": f"{MODELS}:DCGANCritic", "critic_args": {"img": 16, "ch": 4, "extra": 1, "init_std": 0.002},
                  "generator": f"{MODELS}:DCGANGenerator", "generator_args": {"latent_dim": 16, "img": 16, "ch": 4},
                  "latent_dim": 16},
        "data": {"source": "synthetic", "shape": [3, 16, 16], "batch_size": 2},
        "loss": {"kind": "wgan-gp", "gp_norm": "sqrt", **loss},
        "train": {"steps": 1},
        "precision": {"dtypes": ["fp16", "bf16"]},
        "device": "cpu",
        "seed": 0,
    }


def merge(doc: dict, patch: dict) -> dict:
    """A deep copy of doc with patch merged in; a value of DELETE removes the key."""
    out = copy.deepcopy(doc)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


DELETE = object()


def load_fixture_module(path: Path = TINY, name: str | None = None):
    """Import a fixture file for the tests' own use, without writing __pycache__ into tests/fixtures."""
    name = name or f"_nanprobe_test_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    old = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = old
    sys.modules[name] = module
    return module


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


BCE_GAN = FIXTURES / "bce_gan.py"


def bce_gan_doc(**patch) -> dict:
    """A config for tests/fixtures/bce_gan.py: its step runs nn.BCELoss on sigmoid outputs, which autocast
    refuses in fp16 and bf16."""
    doc = {
        "model": {"critic": f"{BCE_GAN}:Discriminator", "generator": f"{BCE_GAN}:Generator", "latent_dim": 8},
        "data": {"shape": [3, 8, 8], "batch_size": 4},
        "loss": {"step": f"{BCE_GAN}:discriminator_step"},
        "train": {"steps": 1},
        "precision": {"dtypes": ["fp32", "fp16", "bf16"]},
        "device": "cpu",
        "seed": 0,
    }
    doc.update(patch)
    return doc


@pytest.fixture(scope="module")
def warm_pytester_imports(tmp_path_factory):
    """For modules that run pytest in-process with pytester: those runs drop the modules they imported, and
    torch's lazily imported parts (dynamo, inductor's test ops) refuse to be registered twice, so one
    diagnose imports them here, once, first."""
    import nanprobe.api

    path = tmp_path_factory.mktemp("warm") / "tiny.yaml"
    path.write_text(yaml.safe_dump(merge(base_doc(), {"precision": {"dtypes": ["fp16", "bf16"]}})), encoding="utf-8")
    nanprobe.api.diagnose(path)


def plugin_args() -> list[str]:
    """`-p` for nanprobe's pytest plugin, unless pytest loads it by itself: installed from a tree with the entry
    point and autoloading on, a second `-p` of the same module would be refused as a duplicate."""
    from importlib.metadata import entry_points

    module = "nanprobe.integrations.pytest_plugin"
    installed = any(ep.name == "nanprobe" and ep.value == module for ep in entry_points(group="pytest11"))
    autoload = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    return [] if installed and autoload else ["-p", module]


def torchrun_ranks(script: Path, out: Path, *args: str) -> dict[int, dict]:
    """Run a fixture under torchrun on two gloo ranks (one OpenMP thread each) and read each rank's
    OUT/rank-R.json."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), *args]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)}


def assert_rank_1_went_first(results: dict[int, dict], step: int, collective: str) -> None:
    """torchrun_ranks' results of a fault on rank 1 only (rank_loop.py): both ranks stop at `step`, rank 1
    names its own op, and rank 0 follows through `collective` and names rank 1's op."""
    assert [results[r]["step"] for r in (0, 1)] == [step, step]
    assert [results[r]["ranks"] for r in (0, 1)] == [[1], [1]]
    # Rank 1 went non-finite by its own forward; rank 0 only through the gradient collective.
    assert results[1]["reason"].startswith("critic output, loss")
    assert results[0]["reason"] == "gradients, weights non-finite"
    culprit = results[1]["culprit"]
    # The user's module path: no FSDP1 `_fsdp_wrapped_module` in it, and no collective before it.
    assert (culprit["phase"], culprit["module"], culprit["op"], culprit["kind"]) == (
        "forward", "critic.net.0", "aten._to_copy.default", "overflow")
    assert results[0]["culprit"] is None  # a follower has no culprit of its own
    for r in (0, 1):
        assert f"step {step} turned non-finite on rank 1 of 2 (critic output" in results[r]["message"]
        assert f"rank 0 followed through the gradient {collective}" in results[r]["message"]
    assert "critic.net.0 (forward)" in results[0]["message"]  # rank 0 names rank 1's op from the collective


def assert_rank_1_dump_replays_alone(results: dict[int, dict], out: Path, monkeypatch) -> None:
    """Rank 1's dump, diagnosed by the CLI on one process with no process group, names the same op."""
    from typer.testing import CliRunner

    from nanprobe.cli import app

    monkeypatch.chdir(out)
    result = CliRunner().invoke(app, ["diagnose", str(Path(results[1]["dump"]) / "config.yaml"), "--json", "-", "-q"])
    assert result.exit_code == 1, result.output
    runs = {r["precision"]: r for r in json.loads(result.stdout)["runs"]}
    assert runs["fp32"]["status"] == "ok"
    issue = runs["fp16"]["first_issue"]
    assert (runs["fp16"]["status"], issue["kind"], issue["phase"], issue["module"]) == (
        "nan", "overflow", "forward", "critic.net.0")


def line_of(path: Path, marker: str) -> int:
    """The 1-based line of the first line of path containing marker."""
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if marker in line:
            return i
    raise AssertionError(f"{marker!r} not in {path}")


@pytest.fixture
def tiny():
    """The tiny_models fixture module."""
    return load_fixture_module()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """write_config(doc_or_text, name="config.yaml") -> the path of a YAML file in tmp_path."""

    def write(doc: Any = None, name: str = "config.yaml", **patch) -> Path:
        if doc is None:
            doc = merge(base_doc(), patch)
        path = tmp_path / name
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="Rewrite the golden files of tests/formats/test_golden.py from this run.")
