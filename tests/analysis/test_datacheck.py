"""check-data: NaN/Inf samples, constant images and range mismatches in .npy and .pt files, in chunks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import nanprobe
from nanprobe.analysis import datacheck
from nanprobe.cli import app
from nanprobe.errors import ConfigError
from tests.conftest import ref

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 8, 8)
ROW_MB = np.prod(SHAPE) * 4 / 2**20  # one float32 sample, in MB


def clean(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, *SHAPE)).astype(np.float32)


def corrupt(n: int = 40) -> np.ndarray:
    x = clean(n)
    x[3, 0, 1, 1] = np.nan
    x[4, 2, :, :] = np.nan
    x[9, 1, 0, 0] = np.inf
    x[10, 1, 0, 0] = -np.inf
    x[10, 0, 0, 0] = np.nan
    x[12] = 0.0
    x[13] = 0.5
    return x


def save(tmp_path: Path, x, name: str = "data.npy", rng=(-1, 1), **data) -> Path:
    """Write x (a numpy array or a tensor) and a config pointing at it; returns the config path."""
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, x)
    else:
        torch.save(torch.as_tensor(x), path)
    doc = {"model": {"critic": ref("TinyCritic")}, "data": {"source": "file", "path": name, "range": list(rng), **data},
           "device": "cpu"}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps(doc), encoding="utf-8")
    return cfg


@pytest.mark.parametrize("name", ["data.npy", "data.pt"])
def test_finds_nan_inf_and_constant_samples_by_index(tmp_path, name):
    rep = nanprobe.check_data(save(tmp_path, corrupt(), name))
    assert rep.memory_mapped and rep.scope == "file" and rep.samples == 40
    assert rep.nonfinite.indices == (3, 4, 9, 10) and rep.nonfinite.count == 4
    assert rep.nonfinite.counts == {"samples_with_nan": 3, "samples_with_inf": 2, "nan_values": 1 + 64 + 1,
                                    "posinf_values": 1, "neginf_values": 1}
    assert rep.constant.indices == (12, 13) and rep.constant.counts["values"] == [0.0, 0.5]
    assert rep.range.ok and -1 <= rep.range.observed_min < -0.9 and 0.9 < rep.range.observed_max <= 1
    assert [p.value for p in rep.problems] == ["non-finite", "constant"]
    assert rep.fix.id == "data"
    assert "non-finite samples: 3, 4, 9, 10" in rep.fix.snippet and "constant images: 12, 13" in rep.fix.snippet


@pytest.mark.parametrize("chunk_samples", [1, 3, 4, 5, 11, 100])
def test_chunk_boundaries_inside_the_bad_samples_change_nothing(tmp_path, chunk_samples):
    cfg = save(tmp_path, corrupt())
    rep = nanprobe.check_data(cfg, chunk_mb=chunk_samples * ROW_MB)
    whole = nanprobe.check_data(cfg, chunk_mb=64)
    assert (rep.nonfinite, rep.constant, rep.range) == (whole.nonfinite, whole.constant, whole.range)


def test_progress_reports_bytes_per_chunk(tmp_path):
    seen = []
    nanprobe.check_data(save(tmp_path, clean(10)), progress=lambda done, total: seen.append((done, total)),
                        chunk_mb=4 * ROW_MB)
    total = 10 * int(np.prod(SHAPE)) * 4
    assert seen == [(4 * total // 10, total), (8 * total // 10, total), (total, total)]


def test_uint8_images_where_minus_one_to_one_is_expected(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, size=(30, *SHAPE), dtype=np.uint8)
    x[7] = 0  # a black image is also constant
    rep = nanprobe.check_data(save(tmp_path, x))
    r = rep.range
    assert not r.ok and r.observed_min == 0 and r.observed_max == 255
    assert r.out_of_range == 29 and r.share == pytest.approx(29 / 30, abs=1e-6)  # the black image stays in range
    assert r.cause == "unnormalised 8-bit images (0..255) stored as uint8" and r.transform == "x / 127.5 - 1"
    assert rep.constant.indices == (7,)
    assert "x = x / 127.5 - 1" in rep.fix.snippet


def test_zero_one_images_where_minus_one_to_one_is_expected(tmp_path):
    x = np.random.default_rng(2).uniform(0, 1, size=(20, *SHAPE)).astype(np.float32)
    r = nanprobe.check_data(save(tmp_path, x)).range
    # Nothing is out of range, but the data sits in [0, 1]: half the range the model expects is unused.
    assert not r.ok and r.out_of_range == 0
    assert r.cause == "images in [0, 1]" and r.transform == "x * 2 - 1"


def test_minus_one_to_one_images_where_zero_one_is_expected(tmp_path):
    r = nanprobe.check_data(save(tmp_path, clean(20), rng=(0, 1))).range
    assert not r.ok and r.out_of_range == 20 and r.transform == "x / 2 + 0.5"


def test_values_in_no_usual_range(tmp_path):
    x = clean(10) * 1e6
    r = nanprobe.check_data(save(tmp_path, x)).range
    assert not r.ok and r.transform is None and "outside data.range and every usual image range" in r.cause


def test_clean_file_and_a_narrower_range_inside_the_expected_one(tmp_path):
    rep = nanprobe.check_data(save(tmp_path, clean() * 0.7))
    assert rep.ok and rep.problems == () and rep.fix is None
    assert rep.to_dict()["problems"] == []


def test_bfloat16_pt_and_overrides(tmp_path):
    x = torch.as_tensor(corrupt()).to(torch.bfloat16)
    cfg = save(tmp_path, x, "data.pt")
    rep = nanprobe.check_data(cfg)
    assert rep.dtype == "torch.bfloat16" and rep.nonfinite.indices == (3, 4, 9, 10)
    assert not nanprobe.check_data(cfg, **{"data.range": [0, 1]}).range.ok


def test_legacy_pt_is_read_whole_and_says_so(tmp_path):
    path = tmp_path / "data.pt"
    torch.save(torch.as_tensor(corrupt()), path, _use_new_zipfile_serialization=False)
    cfg = save(tmp_path, np.zeros(1), "unused.npy")
    rep = nanprobe.check_data(cfg, **{"data.path": str(path)})
    assert not rep.memory_mapped and "cannot be memory-mapped" in rep.notes[0]
    assert rep.nonfinite.indices == (3, 4, 9, 10)


def test_indices_list_is_capped_but_counts_are_not(tmp_path):
    x = clean(100)
    x[::2, 0, 0, 0] = np.nan
    rep = nanprobe.check_data(save(tmp_path, x), chunk_mb=7 * ROW_MB)
    assert rep.nonfinite.count == 50 and rep.nonfinite.indices == tuple(range(0, 2 * datacheck.MAX_INDICES, 2))


@pytest.mark.parametrize("suffix", ["npy", "pt"])
def test_peak_memory_follows_the_chunk_not_the_file(tmp_path, suffix):
    # 192 MB of data scanned in 4 MB chunks: without handing each chunk's pages back, the memory map
    # would leave the whole file resident by the end of the scan.
    n = 192 * 2**20 // (3 * 64 * 64 * 4)
    path = tmp_path / f"big.{suffix}"
    if suffix == "npy":
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 3, 64, 64))
        arr[n // 2, 0, 0, 0] = np.nan
        arr.flush()
        del arr
    else:
        t = torch.zeros(n, 3, 64, 64)
        t[n // 2, 0, 0, 0] = float("nan")
        torch.save(t, path)
        del t
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"model": {"critic": "x.py:C"}, "data": {"source": "file", "path": path.name}}))
    code = ("import sys, nanprobe.analysis.datacheck as d\n"
            f"{'import torch' if suffix == 'pt' else ''}\n"
            "def hwm(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024\n"
            "before = hwm(); r = d.check_data(sys.argv[1], chunk_mb=4)\n"
            "print(r.nonfinite.indices[0], r.memory_mapped, hwm() - before, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=ROOT, capture_output=True, text=True, check=True)
    index, mapped, grew_mb, torch_loaded = out.stdout.split()
    assert (int(index), mapped) == (n // 2, "True")
    assert int(grew_mb) < 48, out.stdout  # a 4 MB chunk, its temporaries and the scan's code; not 192 MB
    assert torch_loaded == str(suffix == "pt")  # a .npy scan needs no torch


def test_replayed_samples_check_for_diagnose(tmp_path):
    x = corrupt()
    from nanprobe.io import config as cfg
    config = cfg.with_overrides(cfg.load(save(tmp_path, x, batch_size=4)), steps=3)
    rep = datacheck.check_replayed(config, np.load(tmp_path / "data.npy", mmap_mode="r"))
    # Steps 0-2 at batch 4 use samples 0-11: the NaN/Inf ones among them and none of the constant ones.
    assert rep.scope == "replayed" and rep.samples == 12
    assert rep.nonfinite.indices == (3, 4, 9, 10) and rep.constant.count == 0
    assert "nanprobe check-data" in rep.notes[0]
    assert datacheck.check_replayed(config, None) is None


# ---- the command line


def test_cli_reports_problems_with_exit_1(tmp_path):
    result = runner.invoke(app, ["check-data", str(save(tmp_path, corrupt())), "--chunk-mb", "0.01"])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "memory-mapped" in out and "float32 [40, 3, 8, 8]" in out
    assert "non-finite │ 4 │ 10.00% │ 3, 4, 9, 10" in out
    assert "constant │ 2 │ 5.00% │ 12, 13" in out
    assert "fix: data" in out and "# non-finite samples: 3, 4, 9, 10" in out


def test_cli_clean_exit_0(tmp_path):
    result = runner.invoke(app, ["check-data", str(save(tmp_path, clean()))])
    assert result.exit_code == 0, result.output
    assert ("40 samples: no NaN or Inf, no constant image, values within data.range [-1, 1]"
            in " ".join(result.output.split()))


def test_cli_range_mismatch_names_the_cause(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, size=(12, *SHAPE), dtype=np.uint8)
    result = runner.invoke(app, ["check-data", str(save(tmp_path, x))], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert ("observed 0 .. 255, data.range [-1, 1]; likely unnormalised 8-bit images (0..255) stored as uint8; "
            "use x = x / 127.5 - 1") in result.output


def test_cli_json_stdout_and_file(tmp_path):
    cfg = save(tmp_path, corrupt())
    result = runner.invoke(app, ["check-data", str(cfg), "--json", "-"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["problems"] == ["non-finite", "constant"] and doc["scope"] == "file"
    assert doc["nonfinite"]["indices"] == [3, 4, 9, 10] and doc["constant"]["count"] == 2
    assert doc["range"]["ok"] is True and doc["fix"]["id"] == "data"
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["check-data", str(cfg), "--json", str(out), "-q"])
    assert result.exit_code == 1 and result.output == ""
    assert json.loads(out.read_text()) == {**doc, "seconds": json.loads(out.read_text())["seconds"]}


@pytest.mark.parametrize("doc, message", [
    ({"model": {"critic": "x.py:C"}}, "data.source is synthetic: there is no data file to scan"),
    ({"model": {"critic": "x.py:C"}, "data": {"source": "file", "path": "nope.npy"}}, "data.path: file not found: "),
    ({"model": {"critic": "x.py:C"}, "data": {"source": "file", "path": "d.csv"}},
     "data.path: d.csv must be a .npy or .pt file"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, doc, message):
    (tmp_path / "d.csv").write_text("1,2\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(doc))
    result = runner.invoke(app, ["check-data", str(cfg)])
    assert result.exit_code == 2
    assert result.stderr.startswith("nanprobe: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_cli_wrong_shape_and_rank_exit_2(tmp_path):
    result = runner.invoke(app, ["check-data", str(save(tmp_path, clean(), shape=[1, 8, 8]))])
    assert result.exit_code == 2
    assert "data.shape: [1, 8, 8] does not match data.npy, whose samples are [3, 8, 8]" in result.stderr
    result = runner.invoke(app, ["check-data", str(save(tmp_path, np.zeros(5, np.float32)))])
    assert result.exit_code == 2 and "has shape [5]; expected [N, C, H, W]" in result.stderr


def test_not_a_tensor_or_not_real_numbers_exit_2(tmp_path):
    torch.save({"x": torch.zeros(2, 3)}, tmp_path / "dict.pt")
    np.save(tmp_path / "mask.npy", np.zeros((4, 3, 8, 8), bool))
    cfg = save(tmp_path, clean())
    with pytest.raises(ConfigError, match="dict.pt holds a dict, not a tensor"):
        nanprobe.check_data(cfg, **{"data.path": "dict.pt"})
    with pytest.raises(ConfigError, match="mask.npy has dtype bool; expected a real number type"):
        nanprobe.check_data(cfg, **{"data.path": "mask.npy"})


def test_pickled_npy_is_refused(tmp_path):
    cfg = save(tmp_path, np.zeros(1))
    np.save(tmp_path / "data.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="not a .npy array file"):
        nanprobe.check_data(cfg)


def test_cli_ctrl_c_exits_130(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datacheck, "check_data", interrupted)
    result = runner.invoke(app, ["check-data", str(save(tmp_path, clean()))])
    assert result.exit_code == 130 and "interrupted" in result.stderr
