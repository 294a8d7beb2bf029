"""nanprobe.io.config: loading, checking, overrides, and the one-line ConfigError for anything wrong."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanprobe import ConfigError
from nanprobe.enums import Kernels, Mode, Policy, Precision
from nanprobe.io import config as cfg
from tests.conftest import base_doc, merge, ref

# Every documented key, each set to a value other than its default.
FULL_DOC = {
    "model": {
        "critic": "models.py:TinyCritic",
        "critic_args": {"ch": 6},
        "generator": "models.py:TinyGenerator",
        "generator_args": {"latent_dim": 16},
        "latent_dim": [16, 1, 1],
        "generator_call": "[z]",
        "checkpoint": "ckpt/critic.pt",
        "init": "he",
        "apply": "models.py:weights_init",
        "script_args": ["--dataset", "fake"],
    },
    "data": {
        "source": "file",
        "path": "data/real.npy",
        "shape": [3, 8, 8],
        "range": [0.0, 1.0],
        "batch_size": 2,
    },
    "loss": {
        "kind": "r1",
        "gp_weight": 5.0,
        "gp_precision": "fp32",
        "gp_norm": "vector_norm",
        "step": "steps.py:critic_step",
    },
    "train": {
        "optimizer": "adamw",
        "lr": 2.0e-4,
        "betas": [0.5, 0.99],
        "eps": 1.0e-6,
        "weight_decay": 0.01,
        "steps": 3,
        "grad_scaler": True,
        "grad_clip": 1.5,
    },
    "precision": {"mode": "half", "dtypes": ["fp16", "bf16"], "policy": "native", "kernels": "native",
                  "fp32_modules": ["critic.net.2"]},
    "state": {"z": "dump/z.pt", "rng": "dump/rng.pt", "optimizer": "dump/optimizer.pt", "scaler": "dump/scaler.pt"},
    "device": "cpu",
    "seed": 7,
}


def test_full_doc_sets_every_documented_key():
    """If a key is added to the config, this test (and FULL_DOC) must learn about it."""
    for name in ("model", "data", "loss", "train", "precision", "state"):
        section_cls = type(getattr(cfg.Config(), name))
        assert set(FULL_DOC[name]) == {f.name for f in dataclasses.fields(section_cls)}, name
    top = {f.name for f in dataclasses.fields(cfg.Config)} - {"base_dir", "source"}
    assert set(FULL_DOC) == top


def test_load_full_config(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_DOC), encoding="utf-8")
    c = cfg.load(path)
    assert c.source == path
    assert c.base_dir == tmp_path.resolve()
    assert c.model.critic == "models.py:TinyCritic"
    assert c.model.critic_args == {"ch": 6}
    assert c.model.generator == "models.py:TinyGenerator"
    assert c.model.generator_args == {"latent_dim": 16}
    assert c.model.latent_dim == (16, 1, 1)
    assert c.model.generator_call == "[z]"
    assert c.model.checkpoint == Path("ckpt/critic.pt")
    assert c.model.apply == "models.py:weights_init"
    assert c.model.script_args == ("--dataset", "fake")
    assert cfg.resolve(c, c.model.checkpoint) == tmp_path.resolve() / "ckpt" / "critic.pt"
    assert c.data == cfg.DataConfig("file", Path("data/real.npy"), (3, 8, 8), (0.0, 1.0), 2)
    assert c.loss == cfg.LossConfig("r1", 5.0, "fp32", "vector_norm", "steps.py:critic_step")
    assert c.train == cfg.TrainConfig("adamw", 2e-4, (0.5, 0.99), 1e-6, 0.01, 3, True, 1.5)
    assert c.model.init == "he"
    assert c.precision == cfg.PrecisionConfig(Mode.HALF, (Precision.FP16, Precision.BF16), Policy.NATIVE,
                                              Kernels.NATIVE,
                                              ("critic.net.2",))
    assert c.state == cfg.StateConfig(*(Path(f"dump/{n}.pt") for n in ("z", "rng", "optimizer", "scaler")))
    assert c.device == "cpu"
    assert c.seed == 7


def test_round_trip_through_to_dict_and_yaml(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_DOC), encoding="utf-8")
    c = cfg.load(path)
    plain = cfg.to_dict(c)
    again = cfg.from_dict(plain, base_dir=tmp_path, source=path)
    assert again == c
    path2 = tmp_path / "again.yaml"
    path2.write_text(yaml.safe_dump(plain), encoding="utf-8")
    assert dataclasses.replace(cfg.load(path2), source=path) == c
    assert cfg.to_dict(again) == plain


def test_minimal_config_gets_the_documented_defaults(tmp_path):
    c = cfg.from_dict({"model": {"critic": "m.py:C"}}, base_dir=tmp_path)
    assert c.model == cfg.ModelConfig(critic="m.py:C")
    assert c.data == cfg.DataConfig()
    assert c.loss == cfg.LossConfig()
    assert c.train == cfg.TrainConfig()
    assert c.precision.mode is Mode.AMP
    assert c.precision.dtypes == (Precision.FP32, Precision.FP16, Precision.BF16)
    assert c.precision.policy is Policy.CUDA
    assert (c.device, c.seed) == ("auto", 0)


def test_short_forms_are_normalised():
    c = cfg.from_dict({"model": {"critic": "m.py:C", "latent_dim": 64, "critic_args": None},
                       "data": {"shape": [1, 4, 4], "range": [0, 255]},
                       "precision": {"dtypes": "fp16", "mode": "amp"}, "loss": None})
    assert c.model.latent_dim == (64,)
    assert c.model.critic_args == {}
    assert c.data.range == (0.0, 255.0)
    assert c.precision.dtypes == (Precision.FP16,)
    duplicated = cfg.from_dict({"model": {"critic": "m.py:C"}, "precision": {"dtypes": ["fp16", "fp16", "fp32"]}})
    assert duplicated.precision.dtypes == (Precision.FP16, Precision.FP32)


def test_config_is_frozen():
    c = cfg.from_dict({"model": {"critic": "m.py:C"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3  # type: ignore[misc]


def test_python_api_accepts_modules_for_critic(tiny):
    critic = tiny.TinyCritic()
    c = cfg.from_dict({"model": {"critic": critic, "generator": tiny.TinyGenerator}})
    assert c.model.critic is critic
    assert c.model.generator is tiny.TinyGenerator


# ---- with_overrides


@pytest.fixture
def base(tmp_path):
    return cfg.from_dict(base_doc(), base_dir=tmp_path)


def test_overrides_short_and_dotted_keys(base):
    c = cfg.with_overrides(base, steps=4, dtypes=["fp16", "bf16"], mode="half", device="auto", seed=3,
                           **{"train.lr": 1e-3, "loss.kind": "hinge", "data__batch_size": 4})
    assert c.train.steps == 4
    assert c.precision.dtypes == (Precision.FP16, Precision.BF16)
    assert c.precision.mode is Mode.HALF
    assert (c.device, c.seed) == ("auto", 3)
    assert c.train.lr == 1e-3
    assert c.loss.kind == "hinge"
    assert c.data.batch_size == 4
    # the original is untouched, everything not overridden is kept
    assert base.train.steps == 1 and base.precision.dtypes == (Precision.FP32,)
    assert c.model == base.model and c.train.optimizer == base.train.optimizer


def test_policy_override_and_report_settings(base):
    assert base.precision.policy is Policy.CUDA
    native = cfg.with_overrides(base, policy="native")
    assert native.precision.policy is Policy.NATIVE
    assert cfg.with_overrides(base, **{"precision.policy": Policy.NATIVE}) == native
    assert cfg.to_dict(native)["precision"]["policy"] == "native"
    assert cfg.to_dict(base)["precision"]["policy"] == "cuda"


def test_none_overrides_are_ignored(base):
    assert cfg.with_overrides(base, steps=None, dtypes=None, mode=None, device=None) == base


@pytest.mark.parametrize("overrides, message", [
    ({"stpes": 3}, "unknown key 'stpes'; did you mean 'steps'?"),
    ({"train.stpes": 3}, "unknown key 'train.stpes'; did you mean 'steps'?"),
    ({"trian.steps": 3}, "unknown key 'trian'; did you mean 'train'?"),
    ({"zzz": 1}, "unknown key 'zzz'; valid keys: dtypes, mode, policy, kernels, steps, device, seed, model.KEY"),
    ({"dtype": "fp16"}, "unknown key 'dtype'; did you mean 'dtypes'?"),
    ({"steps": 0}, "train.steps: must be >= 1, got 0"),
    ({"dtypes": ["fp64"]}, "precision.dtypes: must be one of fp32, fp16, bf16, got 'fp64'"),
    ({"device": "gpu"}, "device: must be one of auto, cpu, cuda, got 'gpu'"),
    ({"policy": "gpu"}, "precision.policy: must be one of cuda, native, got 'gpu'"),
    ({"data.source": "file"}, "data.path is missing"),
])
def test_bad_overrides_raise_config_error(base, overrides, message):
    with pytest.raises(ConfigError) as err:
        cfg.with_overrides(base, **overrides)
    assert message in str(err.value)


# ---- load and from_dict errors (the CLI table checks the same through the command line)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        cfg.load(tmp_path / "nope.yaml")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give the path of a YAML config file"):
        cfg.load(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="empty.yaml is empty; it needs at least model.critic"):
        cfg.load(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {critic: 'café.py:C'}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot read .*latin1.yaml"):
        cfg.load(path)


@pytest.mark.parametrize("text, where", [
    ("model:\n  critic: a.py:C\n  critic_args: {img: 32\ndata: {}\n",
     "at line 4, column 5: expected ',' or '}', but got ':' (while parsing a flow mapping that starts at line 3, "
     "column 16)"),
    ("model:\n\tcritic: a.py:C\n", "at line 2, column 1: found character '\\t' that cannot start any token"),
    ("model: {critic: a.py:C}\ndata: [3, 8\n", "at line 3, column 1: expected ',' or ']', but got '<stream end>' "
     "(while parsing a flow sequence that starts at line 2, column 7)"),
    ("a: b: c\n", "at line 1, column 5: mapping values are not allowed here"),
    ("model:\n  critic: \"a.py:C\n", "(while scanning a quoted scalar that starts at line 2, column 11)"),
    ("model: *anchor\n", "at line 1, column 8: found undefined alias 'anchor'"),
    ("? [a, b]\n: 1\n", "at line 1, column 3: found unhashable key"),
])
def test_yaml_syntax_error_names_the_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid YAML ")
    assert where in message
    assert "\n" not in message


@pytest.mark.parametrize("patch, message", [
    ({"modle": {}}, "unknown key 'modle'; did you mean 'model'?"),
    ({"model": {"critc": "a.py:C"}}, "unknown key 'model.critc'; did you mean 'critic'?"),
    ({"data": {"batchsize": 4}}, "unknown key 'data.batchsize'; did you mean 'batch_size'?"),
    ({"train": {"xyzzy": 1}}, "unknown key 'train.xyzzy'; valid keys: optimizer, lr, betas"),
    ({"data": {"batch_size": "x"}}, "data.batch_size: expected an integer, got 'x' (str)"),
    ({"data": {"batch_size": 2.5}}, "data.batch_size: expected an integer, got 2.5 (float)"),
    ({"data": {"batch_size": True}}, "data.batch_size: expected an integer, got True (bool)"),
    ({"data": {"batch_size": -4}}, "data.batch_size: must be >= 1, got -4"),
    ({"data": {"batch_size": 10**6}}, "data.batch_size: must be <= 65536"),
    ({"data": {"shape": [3, 0, 8]}}, "data.shape: every dimension must be a positive integer, got [3, 0, 8]"),
    ({"data": {"shape": "3x8x8"}}, "data.shape: expected a list of at least 1 positive integers"),
    ({"data": {"range": [1]}}, "data.range: expected a list of two numbers"),
    ({"data": {"range": [1, 1]}}, "data.range: the low end must be below the high end"),
    ({"data": {"source": "files"}}, "did you mean 'file'?"),
    ({"loss": {"kind": "wgangp"}}, "loss.kind: must be one of wgan-gp, r1, hinge, non-saturating, got 'wgangp' "
                                   "(did you mean 'wgan-gp'?)"),
    ({"loss": {"gp_weight": float("nan")}}, "loss.gp_weight: expected a finite number"),
    ({"loss": {"gp_weight": -1}}, "loss.gp_weight: must be >= 0.0, got -1"),
    ({"loss": {"step": ""}}, "loss.step: expected a non-empty string"),
    ({"train": {"lr": 0}}, "train.lr: must be > 0.0, got 0"),
    ({"train": {"lr": 10**400}}, "train.lr: expected a finite number"),
    ({"train": {"betas": [0.9, 1.0]}}, "train.betas: each beta must be in [0, 1)"),
    ({"train": {"grad_scaler": "yes"}}, "train.grad_scaler: expected true or false, got 'yes' (str)"),
    ({"train": {"grad_clip": 0}}, "train.grad_clip: must be > 0.0"),
    ({"train": {"optimizer": "adma"}}, "did you mean 'adam'?"),
    ({"train": {"steps": 0}}, "train.steps: must be >= 1, got 0"),
    ({"precision": {"dtypes": []}}, "precision.dtypes: expected a non-empty list of fp32, fp16, bf16"),
    ({"precision": {"dtypes": ["fp16", "float16"]}}, "precision.dtypes: must be one of fp32, fp16, bf16"),
    ({"precision": {"mode": "amp16"}}, "precision.mode: must be one of amp, half, got 'amp16' (did you mean 'amp'?)"),
    ({"precision": {"policy": "cude"}},
     "precision.policy: must be one of cuda, native, got 'cude' (did you mean 'cuda'?)"),
    ({"precision": {"polcy": "cuda"}}, "unknown key 'precision.polcy'; did you mean 'policy'?"),
    ({"device": "cuda:1"}, "device: must be one of auto, cpu, cuda, got 'cuda:1' (did you mean 'cuda'?)"),
    ({"seed": -1}, "seed: must be >= 0, got -1"),
    ({"model": {"critic_args": [1, 2]}}, "model.critic_args: expected a mapping of argument names to values"),
    ({"model": {"critic_args": {1: 2}}}, "model.critic_args: expected a mapping of argument names to values"),
    ({"model": {"latent_dim": [8, -1]}}, "model.latent_dim: every dimension must be a positive integer"),
    ({"model": {"checkpoint": 3}}, "model.checkpoint: expected a non-empty string, got 3 (int)"),
    ({"model": {"critic": None}}, "model.critic is missing; set it to 'models.py:Critic'"),
    ({"model": {"critic": None}, "loss": {"step": "s.py:f"}}, "model.critic is missing; a custom loss.step"),
    ({"data": {"source": "file"}}, "data.path is missing; data.source is 'file'"),
    ({"data": {"path": "x.npy"}}, "data.path is set but data.source is 'synthetic'"),
    ({"train": "fast"}, "train: expected a mapping, got 'fast' (str)"),
])
def test_bad_values_name_the_key(patch, message):
    with pytest.raises(ConfigError) as err:
        cfg.from_dict(merge(base_doc(), patch))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("raw, message", [
    (None, "the config is empty"),
    ([1, 2], "the config must be a YAML mapping of sections, got list"),
    ("model", "the config must be a YAML mapping of sections, got str"),
    ({}, "model.critic is missing"),
])
def test_bad_documents(raw, message):
    with pytest.raises(ConfigError, match=message):
        cfg.from_dict(raw)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"critic": "m.py:C", "checkpoint": "w/c.pt"}}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    c = cfg.load(Path("project/c.yaml"))
    assert cfg.resolve(c, c.model.checkpoint) == folder.resolve() / "w" / "c.pt"
    assert cfg.resolve(c, Path("/abs/x.pt")) == Path("/abs/x.pt")


# ---- property: from_dict returns a Config or raises ConfigError, never anything else

_VALID_KEYS = sorted({k for _, checks in cfg.SECTIONS.values() for k in checks} | set(cfg.SECTIONS) | set(cfg.TOP))
_GOOD_VALUES = ["m.py:C", ref("TinyCritic"), "fp16", "fp32", ["fp16", "bf16"], "amp", "half", "wgan-gp", "file",
                "synthetic", "cpu", "auto", [3, 8, 8], [-1, 1], [0.0, 0.9], 8, 1, 0, 1e-4, True, None, {}]

_EDGES = [10**400, -(10**400), 2**63, 2**64, -1, 0, 65537, float("inf"), float("-inf"), float("nan"), -0.0,
          1e308, "", " ", [], {}, [[]], [None], True]
_keys = st.one_of(st.sampled_from(_VALID_KEYS), st.text(max_size=8))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.sampled_from(_EDGES),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(_GOOD_VALUES),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.one_of(_keys, st.integers()), inner, max_size=4),
    max_leaves=12,
)


def _section(name: str):
    checks = cfg.SECTIONS[name][1]
    return st.dictionaries(st.one_of(st.sampled_from(sorted(checks)), _keys), _values, max_size=len(checks))


_DOTTED = [(name, key) for name, (_, checks) in cfg.SECTIONS.items() for key in checks] + [(k, None) for k in cfg.TOP]


def _mutated(doc: dict, changes: list) -> dict:
    """A valid document with a few keys (or whole sections) replaced by arbitrary values."""
    out = merge(doc, {})
    for (section, key), value in changes:
        if key is None or not isinstance(out.get(section), dict):
            out[section] = value
        else:
            out[section][key] = value
    return out


_mutations = st.builds(_mutated, st.sampled_from([base_doc(), FULL_DOC]),
                       st.lists(st.tuples(st.sampled_from(_DOTTED), st.one_of(st.sampled_from(_EDGES), _values)),
                                min_size=1, max_size=3))

_documents = st.one_of(
    _mutations,
    _mutations,
    st.fixed_dictionaries({}, optional={
        **{name: st.one_of(_section(name), _values) for name in cfg.SECTIONS},
        "device": _values, "seed": _values,
    }).flatmap(lambda d: st.builds(lambda extra: {**d, **extra}, st.dictionaries(_keys, _values, max_size=2))),
    st.builds(lambda d, crit: merge(d, {"model": {"critic": crit}}),
              st.fixed_dictionaries({}, optional={name: _section(name) for name in cfg.SECTIONS}),
              st.sampled_from(["m.py:C", ref("TinyCritic")])),
    _values,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents)
def test_from_dict_returns_a_config_or_raises_config_error(doc):
    try:
        c = cfg.from_dict(doc)
    except ConfigError as exc:
        message = str(exc)
        assert message.strip(), "a ConfigError needs a message"
        return
    assert isinstance(c, cfg.Config)
    cfg.to_dict(c)  # a checked config can always be reported


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("5e-5", 5e-5), ("1.0e-8", 1e-8), ("2E3", 2000.0),
                                         ("0.9905854", 0.9905854), ("3", 3)])
def test_yaml_numbers_are_read_as_users_write_them(tmp_path, text, value):
    # YAML 1.1 (PyYAML's default) reads 1e-4 as a string; users type it, papers print it.
    doc = yaml.safe_dump(merge(base_doc(), {"train": {"lr": 0.5}}), sort_keys=False)
    path = tmp_path / "c.yaml"
    path.write_text(doc.replace("lr: 0.5", f"lr: {text}"), encoding="utf-8")
    config = cfg.load(path)
    assert config.train.lr == value and isinstance(config.train.lr, (int, float))
