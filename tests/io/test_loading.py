"""nanprobe.io.loading: the user's models, step, checkpoint and data, and the one-line errors for each."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanprobe import ConfigError, DeviceError, UserCodeError
from nanprobe.io import config as cfg
from nanprobe.io import loading
from tests.conftest import BROKEN, FIXTURES, TINY, base_doc, line_of, merge, ref


def make(tmp_path: Path, **patch) -> cfg.Config:
    return cfg.from_dict(merge(base_doc(), patch), base_dir=tmp_path)


def build(config: cfg.Config, key: str = "model.critic") -> torch.nn.Module:
    section = config.model
    name = key.split(".")[1]
    module, _ = loading.build_module(config, getattr(section, name), getattr(section, f"{name}_args"), key)
    return module


# ---- models


def test_loads_the_tiny_models(tmp_path, tiny):
    loaded = loading.load(make(tmp_path))
    assert type(loaded.critic).__name__ == "TinyCritic"
    assert type(loaded.generator).__name__ == "TinyGenerator"
    assert loaded.step_fn is None
    assert loaded.data is None
    assert loaded.sample_shape == (3, 8, 8)
    assert str(TINY) in loaded.user_files


INITS = """
import torch


def constant_init(m):
    # the DCGAN idiom, written as users write it: one function, class names tested by string
    if m.__class__.__name__.find("Conv") != -1:
        torch.nn.init.constant_(m.weight, 0.01)


def broken_init(m):
    return m.weight.data.normal_(0.0, 0.02)  # no .weight on a ReLU or a Sequential
"""


def test_model_apply_runs_the_user_s_weight_init_on_both_models_before_the_checkpoint(tmp_path):
    (tmp_path / "inits.py").write_text(INITS, encoding="utf-8")
    loaded = loading.load(make(tmp_path, model={"apply": "inits.py:constant_init"}))
    convs = [m for model in (loaded.critic, loaded.generator) for m in model.modules()
             if "Conv" in type(m).__name__]
    assert convs and all(bool((m.weight == 0.01).all()) for m in convs)
    # A checkpoint is what training left: it loads over the init.
    sd = {k: torch.full_like(v, 0.5) for k, v in loading.load(make(tmp_path)).critic.state_dict().items()}
    torch.save({"critic": sd}, tmp_path / "ckpt.pt")
    loaded = loading.load(make(tmp_path, model={"apply": "inits.py:constant_init", "checkpoint": "ckpt.pt"}))
    assert all(bool((p == 0.5).all()) for p in loaded.critic.parameters())


def test_model_apply_errors_are_one_line(tmp_path):
    (tmp_path / "inits.py").write_text(INITS, encoding="utf-8")
    with pytest.raises(UserCodeError, match=r"model.apply: broken_init on the critic raised AttributeError: .*"
                                            r"inits.py:12"):
        loading.load(make(tmp_path, model={"apply": "inits.py:broken_init"}))
    with pytest.raises(ConfigError, match="model.apply: 'inits.py' has no attribute 'missing'; it defines"):
        loading.load(make(tmp_path, model={"apply": "inits.py:missing"}))
    with pytest.raises(ConfigError, match="model.apply: 'consts.py:INITS' is a str, not a function of one module"):
        (tmp_path / "consts.py").write_text("INITS = 'x'\n", encoding="utf-8")
        loading.load(make(tmp_path, model={"apply": "consts.py:INITS"}))


def test_no_generator_means_none(tmp_path):
    assert loading.load(make(tmp_path, model={"generator": None})).generator is None


def test_factory_with_args(tmp_path):
    critic = build(make(tmp_path, model={"critic": ref("make_critic"), "critic_args": {"ch": 6}}))
    assert critic.net[0].out_channels == 6


def test_relative_model_path_resolves_against_the_config_folder(tmp_path, monkeypatch):
    shutil.copy(TINY, tmp_path / "models.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    critic = build(make(tmp_path, model={"critic": "models.py:TinyCritic"}))
    assert type(critic).__name__ == "TinyCritic"


def test_python_api_takes_modules_and_classes(tmp_path, tiny):
    critic = tiny.TinyCritic()
    doc = base_doc()
    doc["model"].update(critic=critic, generator=tiny.TinyGenerator)
    loaded = loading.load(cfg.from_dict(doc, base_dir=tmp_path))
    assert loaded.critic is not critic  # a copy: nanprobe never changes the user's module
    assert all(torch.equal(a, b) for a, b in zip(loaded.critic.state_dict().values(), critic.state_dict().values()))
    assert isinstance(loaded.generator, tiny.TinyGenerator)


def test_package_module_reference(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)
    critic = build(make(tmp_path, model={"critic": "tiny_models:make_critic"}))
    assert type(critic).__name__ == "TinyCritic"
    assert not (FIXTURES / "__pycache__").exists()
    sys.modules.pop("tiny_models", None)


@pytest.mark.parametrize("critic, error, message", [
    ("nope.py:Critic", ConfigError, "model.critic: file not found: {tmp}/nope.py"),
    ("no_such_pkg_xyz:Critic", ConfigError, "model.critic: no module named 'no_such_pkg_xyz'; use 'file.py:Critic'"),
    ("TinyCritic", ConfigError, "model.critic: 'TinyCritic' must be 'file.py:Name' or 'package.module:Name'"),
    (ref("Critc"), ConfigError, "has no attribute 'Critc'; it defines TinyCritic, TinyGenerator, WrongShapeGenerator, "
                                "make_critic, RaisingCritic"),
    (ref("NOT_CALLABLE"), ConfigError, "is a int, not a class or factory returning an nn.Module"),
    (ref("not_a_module"), ConfigError, "model.critic: not_a_module returned a list, not an nn.Module"),
    (ref("RaisingCritic"), UserCodeError,
     f"building RaisingCritic raised RuntimeError: RaisingCritic refuses to build ({TINY}:"
     f"{line_of(TINY, 'RAISE-IN-INIT')})"),
    (ref("raising_factory"), UserCodeError,
     f"building raising_factory raised ValueError: the factory broke ({TINY}:{line_of(TINY, 'RAISE-IN-FACTORY')})"),
    (ref("TypeErrorCritic"), UserCodeError,
     f"building TypeErrorCritic raised TypeError: object of type 'int' has no len() ({TINY}:"
     f"{line_of(TINY, 'RAISE-TYPEERROR-IN-INIT')})"),
    (ref("Critic", BROKEN), UserCodeError,
     f"importing broken_import.py raised ImportError: broken_import needs a package that is not installed "
     f"({BROKEN}:{line_of(BROKEN, 'RAISE-AT-IMPORT')})"),
])
def test_model_errors(tmp_path, critic, error, message):
    with pytest.raises(error) as err:
        build(make(tmp_path, model={"critic": critic}))
    assert message.format(tmp=tmp_path.resolve()) in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_critic_args_blame_the_args(tmp_path):
    with pytest.raises(ConfigError, match=r"model.critic: calling TinyCritic\(\*\*model.critic_args\) failed: "
                                          r".*unexpected keyword argument 'chan'"):
        build(make(tmp_path, model={"critic_args": {"chan": 3}}))


def test_a_syntax_error_in_the_users_file_names_the_line(tmp_path):
    path = tmp_path / "models.py"
    path.write_text("import torch\n\nclass Critic(torch.nn.Module)\n    pass\n", encoding="utf-8")
    with pytest.raises(UserCodeError) as err:
        build(make(tmp_path, model={"critic": "models.py:Critic"}))
    assert "importing models.py raised SyntaxError" in str(err.value)
    assert f"({path}:3)" in str(err.value)


def test_importing_the_users_file_writes_no_pycache(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    shutil.copy(TINY, user / "models.py")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # the environment may set PYTHONDONTWRITEBYTECODE
    critic = build(make(tmp_path, model={"critic": str(user / "models.py") + ":TinyCritic"}))
    assert type(critic).__name__ == "TinyCritic"
    assert sorted(p.name for p in user.iterdir()) == ["models.py"]
    assert sys.dont_write_bytecode is False  # restored
    # Control: a plain import of the same file here would have written __pycache__.
    control = tmp_path / "control"
    control.mkdir()
    shutil.copy(TINY, control / "models.py")
    spec = importlib.util.spec_from_file_location("_nanprobe_control_models", control / "models.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (control / "__pycache__").is_dir()


def test_a_failed_import_is_not_cached(tmp_path):
    path = tmp_path / "models.py"
    path.write_text("raise RuntimeError('not yet')\n", encoding="utf-8")
    config = make(tmp_path, model={"critic": "models.py:TinyCritic"})
    with pytest.raises(UserCodeError, match="not yet"):
        build(config)
    shutil.copy(TINY, path)
    assert type(build(config)).__name__ == "TinyCritic"


# ---- the step function


def test_good_step(tmp_path, tiny):
    loaded = loading.load(make(tmp_path, loss={"step": ref("critic_step")}))
    assert loaded.step_fn.__name__ == "critic_step"


def test_step_signatures(tmp_path):
    path = tmp_path / "steps.py"
    path.write_text(
        "def defaults(critic, generator, real, z, scale=1.0):\n    pass\n"
        "def var(*args):\n    pass\n"
        "def too_many(critic, generator, real, z, extra):\n    pass\n"
        "def too_few(critic, real, z):\n    pass\n", encoding="utf-8")
    for name in ("defaults", "var"):
        fn, _ = loading.load_step(make(tmp_path, loss={"step": f"steps.py:{name}"}))
        assert fn.__name__ == name
    for name, params in (("too_many", "critic, generator, real, z, extra"), ("too_few", "critic, real, z")):
        expected = rf"loss.step: {name}\({params}\) must take \(critic, generator, real, z\)"
        with pytest.raises(ConfigError, match=expected):
            loading.load_step(make(tmp_path, loss={"step": f"steps.py:{name}"}))


# ---- checkpoints


def _critic_sd(tiny, ch: int = 4) -> dict:
    torch.manual_seed(123)
    return tiny.TinyCritic(ch=ch).state_dict()


@pytest.mark.parametrize("form", ["nested", "bare", "training-checkpoint"])
def test_checkpoint_forms_load_the_weights(tmp_path, tiny, form):
    sd, gsd = _critic_sd(tiny), tiny.TinyGenerator().state_dict()
    obj = {"nested": {"critic": sd, "generator": gsd}, "bare": sd,
           "training-checkpoint": {"critic": sd, "generator": gsd, "epoch": 3, "optimizer": {"lr": 1e-4}}}[form]
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = loading.load(make(tmp_path, model={"checkpoint": "ckpt.pt"}))
    for k, v in loaded.critic.state_dict().items():
        assert torch.equal(v, sd[k]), k
    if form != "bare":
        for k, v in loaded.generator.state_dict().items():
            assert torch.equal(v, gsd[k]), k


@pytest.mark.parametrize("obj, message", [
    ("missing", "ckpt.pt does not fit the critic: missing keys net.2.weight, net.2.bias"),
    ("unexpected", "ckpt.pt does not fit the critic: unexpected keys extra.weight"),
    ("shapes", "ckpt.pt does not fit the critic: wrong shapes net.0.weight (8, 3, 4, 4) vs (4, 3, 4, 4), "
               "net.0.bias (8,) vs (4,), net.2.weight (1, 8, 4, 4) vs (1, 4, 4, 4) (checkpoint vs model)"),
    ("list", "ckpt.pt holds a list, not a state_dict or {'critic': state_dict, 'generator': state_dict}"),
    ("tensor", "ckpt.pt holds a Tensor, not a state_dict"),
])
def test_checkpoint_errors(tmp_path, tiny, obj, message):
    sd = _critic_sd(tiny)
    if obj == "missing":
        sd = {k: v for k, v in sd.items() if not k.startswith("net.2")}
    elif obj == "unexpected":
        sd["extra.weight"] = torch.zeros(1)
    elif obj == "shapes":
        sd = _critic_sd(tiny, ch=8)
    elif obj == "list":
        sd = list(sd.values())
    elif obj == "tensor":
        sd = torch.zeros(3)
    torch.save(sd, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError) as err:
        loading.load(make(tmp_path, model={"checkpoint": "ckpt.pt"}))
    assert f"model.checkpoint: {message}" in str(err.value)


class Refused:
    """Saved with torch.save: loading it would need to import this class, which weights_only refuses."""

    def __init__(self):
        self.state = {"w": 1}


def test_checkpoint_refused_by_weights_only_runs_no_code(tmp_path, monkeypatch):
    torch.save({"critic": Refused()}, tmp_path / "ckpt.pt")
    constructed = []
    monkeypatch.setattr(Refused, "__setstate__", lambda self, state: constructed.append(state), raising=False)
    with pytest.raises(ConfigError) as err:
        loading.load(make(tmp_path, model={"checkpoint": "ckpt.pt"}))
    message = str(err.value)
    assert message.startswith("model.checkpoint: ckpt.pt holds objects that torch.load(weights_only=True) refused "
                              f"(it would have to import {Refused.__module__}.Refused); no code from it was run")
    assert "\x1b" not in message and "\n" not in message
    assert constructed == []


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"model.checkpoint: file not found: .*ckpt.pt"):
        loading.load(make(tmp_path, model={"checkpoint": "ckpt.pt"}))


# ---- data


def _array(n=4, shape=(3, 8, 8)):
    return np.random.default_rng(0).uniform(-1, 1, (n, *shape)).astype(np.float32)


def test_npy_data_is_memory_mapped_and_shape_inferred(tmp_path):
    np.save(tmp_path / "d.npy", _array(5))
    data, shape = loading.load_data(make(tmp_path, data={"source": "file", "path": "d.npy", "shape": None}))
    assert isinstance(data, np.memmap)
    assert shape == (3, 8, 8) and data.shape == (5, 3, 8, 8)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_pt_data(tmp_path, legacy):
    torch.save(torch.from_numpy(_array()), tmp_path / "d.pt", _use_new_zipfile_serialization=not legacy)
    data, shape = loading.load_data(make(tmp_path, data={"source": "file", "path": "d.pt"}))
    assert isinstance(data, torch.Tensor) and shape == (3, 8, 8)


def test_synthetic_data_uses_the_shape(tmp_path):
    assert loading.load_data(make(tmp_path, data={"shape": [1, 4, 4]})) == (None, (1, 4, 4))
    assert loading.load_data(make(tmp_path, data={"shape": None})) == (None, loading.DEFAULT_SHAPE)


@pytest.mark.parametrize("name, array, message", [
    ("d.npy", np.zeros((4, 3), np.float32), "data.path: d.npy has shape [4, 3]; expected [N, C, H, W]"),
    ("d.npy", _array(4, (3, 16, 16)), "data.shape: [3, 8, 8] does not match d.npy, whose samples are [3, 16, 16]"),
    ("d.npy", np.zeros((0, 3, 8, 8), np.float32), "data.path: d.npy holds no samples"),
    ("d.npy", np.zeros((2, 3, 8, 8), np.complex64), "data.path: d.npy has dtype complex64"),
    ("d.npy", np.array([{"a": 1}] * 4, dtype=object), "data.path: cannot read d.npy"),
    ("d.csv", None, "data.path: d.csv must be a .npy or .pt file"),
    ("gone.npy", None, "data.path: file not found: {tmp}/gone.npy"),
])
def test_data_errors(tmp_path, name, array, message):
    if array is not None:
        np.save(tmp_path / name, array, allow_pickle=True)
    elif name != "gone.npy":
        (tmp_path / name).write_text("1,2,3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        loading.load(make(tmp_path, data={"source": "file", "path": name}))
    assert message.format(tmp=tmp_path.resolve()) in str(err.value)
    assert "\n" not in str(err.value)


# ---- the dry run: shape mismatches fail before any replay


def test_generator_shape_mismatch(tmp_path):
    with pytest.raises(ConfigError, match=r"model.generator: produces samples of shape \[3, 4, 4\] but the data's "
                                          r"are \[3, 8, 8\]; check data.shape and model.latent_dim"):
        loading.load(make(tmp_path, model={"generator": ref("WrongShapeGenerator")}))


def test_latent_dim_mismatch_names_the_users_code(tmp_path):
    with pytest.raises(UserCodeError, match=r"the generator on z of shape \[2, 5\] \(model.latent_dim\) raised"):
        loading.load(make(tmp_path, model={"latent_dim": 5}))


def test_critic_that_does_not_return_scores(tmp_path):
    with pytest.raises(ConfigError, match="model.critic: returns dict; it must return a tensor of scores"):
        loading.load(make(tmp_path, model={"critic": ref("NoScoreCritic"), "generator": None}))


# ---- the API raises the documented error classes


def test_api_error_classes(tmp_path):
    import nanprobe

    with pytest.raises(ConfigError):
        nanprobe.diagnose(tmp_path / "nope.yaml")
    with pytest.raises(UserCodeError):
        nanprobe.diagnose(make(tmp_path, model={"critic": ref("raising_factory")}))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU is available"):
            nanprobe.diagnose(make(tmp_path), device="cuda")
    assert all(issubclass(e, nanprobe.NanprobeError) and e.exit_code == 2
               for e in (ConfigError, UserCodeError, DeviceError))


def test_user_folder_leaves_sys_path_after_import(tmp_path):
    import sys

    from nanprobe.io import config as cfg
    from nanprobe.io import loading
    (tmp_path / "helper_mod.py").write_text("SCALE = 2\n")
    (tmp_path / "mine.py").write_text(
        "import torch\nimport helper_mod\n\n"
        "class C(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.l = torch.nn.Linear(4, helper_mod.SCALE - 1)\n"
        "    def forward(self, x):\n        return self.l(x.flatten(1))\n")
    config = cfg.from_dict({"model": {"critic": "mine.py:C"}, "data": {"shape": [4]}}, base_dir=tmp_path)
    loaded = loading.load(config)
    assert str(tmp_path.resolve()) not in sys.path
    assert loaded.critic.l.out_features == 1  # its neighbour was importable while it loaded


def _repo(root: Path, width: int) -> Path:
    """A repository laid out as many GAN projects are: models/ and utils/ packages, run from the top."""
    (root / "models").mkdir(parents=True)
    (root / "utils").mkdir()
    (root / "models" / "__init__.py").write_text("")
    (root / "utils" / "__init__.py").write_text("")
    (root / "utils" / "sizes.py").write_text(f"WIDTH = {width}\n")
    (root / "models" / "blocks.py").write_text(
        "import torch\n\ndef block(n_in, n_out):\n    return torch.nn.Linear(n_in, n_out)\n")
    (root / "models" / "critic.py").write_text(
        "import torch\nfrom utils.sizes import WIDTH\nfrom .blocks import block\n\n"
        "class Critic(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.net = torch.nn.Sequential(block(4, WIDTH), torch.nn.LeakyReLU(0.2), block(WIDTH, 1))\n"
        "    def forward(self, x):\n        return self.net(x.flatten(1))\n")
    return root


@pytest.fixture
def forget_repos(tmp_path):
    yield
    for name, mod in list(sys.modules.items()):
        if str(tmp_path) in str(getattr(mod, "__file__", "") or ""):
            del sys.modules[name]


def test_a_file_in_a_package_imports_its_repository_as_python_main_py_there_would(tmp_path, forget_repos,
                                                                                   monkeypatch):
    # models/critic.py imports the repository's other package (utils) and its own sibling relatively:
    # both work under `python main.py` at the top, so they must work under nanprobe.
    repo = _repo(tmp_path / "repo", 7)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    before = list(sys.path)
    config = cfg.from_dict({"model": {"critic": "models/critic.py:Critic"}, "data": {"shape": [4]}}, base_dir=repo)
    loaded = loading.load(config)
    assert loaded.critic.net[0].out_features == 7
    assert sys.path == before
    assert not list(repo.rglob("__pycache__"))


def test_a_second_project_with_the_same_package_names_gets_its_own_file(tmp_path, forget_repos):
    first = _repo(tmp_path / "first", 3)
    second = _repo(tmp_path / "second", 5)
    for repo, width in ((first, 3), (second, 5)):
        config = cfg.from_dict({"model": {"critic": "models/critic.py:Critic"}, "data": {"shape": [4]}},
                               base_dir=repo)
        critic = loading.load(config).critic
        assert critic.net[0].out_features in (3, width)  # utils.sizes is the first one's, as Python caches it
        source = Path(sys.modules[type(critic).__module__].__file__).resolve()
        assert source == (repo / "models" / "critic.py").resolve()
