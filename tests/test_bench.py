"""bench.py: the benchmark runs end to end in its tiny mode and writes JSON with every field issue 7 asks for
(numbers, or null where a peer is missing). No timing assertions: speed on shared machines is noise."""

import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bench

REQUIRED = {
    "matmul_flops": ("fp32", "bf16"),
    "train_2d": ("samples_per_s", "fraction_of_matmul", "speedup_vs_fp32", "ratio_vs_monai"),
    "train_3d": ("samples_per_s", "fraction_of_matmul", "speedup_vs_fp32", "ratio_vs_monai"),
    "data": ("cache_speedup", "sampling_share_of_step"),
    "infer_2d": ("slices_per_s",),
    "infer_3d": ("seconds_per_volume", "ratio_vs_monai", "peak_memory_mb"),
}


def _strict_json(text: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"bench.json holds {constant}, which is not valid JSON")

    return json.loads(text, parse_constant=refuse)


def test_smoke_run_writes_every_field(phantom_2d_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--device", "cpu", "--data-dir", str(phantom_2d_dir), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]
    assert bench.main(argv) == 0
    result = _strict_json(out.read_text())
    assert result["device"] == "cpu"
    numbers = [result["epoch_speedup_vs_student"]]
    for section, fields in REQUIRED.items():
        for field in fields:
            assert field in result[section], f"{section}.{field} missing"
            numbers.append(result[section][field])
    monai_installed = bench.Bench(bench.PLANS["smoke"], bench.TrainConfig(), torch.device("cpu"), tmp_path,
                                  None).peer(2) is not None
    for value in numbers:
        assert value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value > 0), numbers
    assert (None not in numbers) == monai_installed
    assert set(result["targets"]) == set(bench.TARGETS)
    assert result["settings"]["plan"]["name"] == "smoke" and result["epoch"]["extrapolated"] is True
    assert 0 < result["epoch"]["student_reading_share"] < 1 and result["epoch"]["speedup_without_student_reading"] > 0
    assert isinstance(result["settings"]["keep_freed_memory"], bool)
    assert "| measure | value | target | met |" in capsys.readouterr().out


def test_peer_is_none_without_monai(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)  # makes `from monai.networks.nets import` fail
    setup = bench.Bench(bench.PLANS["smoke"], bench.TrainConfig(), torch.device("cpu"), tmp_path, None)
    assert setup.peer(2) is None
    checks = bench.check_targets({"train_2d": {"ratio_vs_monai": None, "speedup_vs_fp32": 3.0},
                                  "data": {"sampling_share_of_step": 0.2}})
    assert checks["train_2d.ratio_vs_monai"]["met"] is None
    assert checks["train_2d.speedup_vs_fp32"]["met"] is True
    assert checks["data.sampling_share_of_step"]["met"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS is read from /proc/self/statm")
def test_peak_memory_sees_an_allocation(tmp_path):
    setup = bench.Bench(bench.PLANS["smoke"], bench.TrainConfig(), torch.device("cpu"), tmp_path, None)

    def allocate() -> float:
        array = np.ones(64 * 2**20 // 8)
        time.sleep(0.05)  # the polling thread needs the GIL while the array is alive
        return float(array.sum())

    total, above_start, absolute = bench.peak_memory_mb(setup, allocate)
    assert total == 64 * 2**20 // 8
    assert 48 < above_start <= absolute  # a 64 MB array, touched page by page


# ---------------------------------------------------------------- GPU: what can be checked without one, and the run


def test_cuda_plans_measure_full_size_with_a_gpu_sized_matmul():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert bench.plan_for("quick", cpu) == bench.PLANS["quick"]  # the CPU runs as before
    quick = bench.plan_for("quick", cuda)
    assert quick.matmul_size == 8192 and quick.patch_3d is None and quick.volume_3d == (256, 256, 128)
    assert quick.name == "quick" and bench.plan_for("smoke", cuda) == bench.PLANS["smoke"]
    assert bench.plan_for("full", cuda).matmul_size == 8192
    assert [name for name, _, _ in bench.matmul_precisions(cpu)] == ["fp32", "bf16"]
    assert set(bench.GPU_TARGETS).isdisjoint({"train_2d.fraction_of_matmul", "train_2d.speedup_vs_fp32"})


def test_tf32_switch_is_restored():
    before = bench.tf32_in_use()
    with bench.cublas_tf32(True):
        assert bench.tf32_in_use()["matmul"] is True
        with bench.cublas_tf32(False):
            assert bench.tf32_in_use()["matmul"] is False
        assert bench.tf32_in_use()["matmul"] is True
    assert bench.tf32_in_use() == before


def test_3d_sampling_section_times_both_placements(tmp_path):
    setup = bench.Bench(bench.PLANS["smoke"], bench.TrainConfig(), torch.device("cpu"), tmp_path, None)
    result = bench.bench_sampling_3d(setup, step_seconds=1.0)
    for placement in ("device", "host"):
        assert 0 < result[f"{placement}_share_of_step"] == result[f"{placement}_seconds_mean"]
    assert result["patch"] == [32, 32, 16] and result["batch"] == 1


def test_gpu_table_lists_the_gpu_rows_and_targets():
    result = {"device": "cuda:0", "settings": {"plan": {"name": "quick"}}, "matmul_flops": {"fp32": 5e13, "tf32": 1e14},
              "train_2d": {"matmul_dtype": "bf16", "peak_memory_mb": 900.0, "channels_last_speedup": None},
              "train_3d": {"matmul_dtype": "bf16", "peak_share_of_reserve": 0.5},
              "sampling_3d": {"host_share_of_step": 0.2}}
    result["targets"] = bench.check_targets(result, bench.GPU_TARGETS)
    table = bench.markdown_table(result)
    assert "| matmul tf32 GFLOP/s | 100000 |" in table
    assert "| train_2d default: peak memory MB | 900 |  |  |" in table
    assert "| train_3d default: peak memory / sampling reserve | 0.5 | < 1 | yes |" in table
    assert "| sampling_3d: share of a 3D step, scans in host memory | 0.2 | < 0.05 | **no** |" in table
    assert "| train_2d default: channels-last / contiguous (speed) | n/a |" in table
    assert "train_2d: default / fp32 | n/a |  |" in table  # a CPU target, not a GPU one
    result["device"] = "cpu"
    assert "peak memory / sampling reserve" not in bench.markdown_table(result)


@pytest.mark.cuda
def test_cuda_smoke_run_writes_the_gpu_fields(phantom_2d_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--device", "cuda", "--data-dir", str(phantom_2d_dir), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out)]
    assert bench.main(argv) == 0
    result = _strict_json(out.read_text())
    assert result["device"].startswith("cuda") and set(result["targets"]) == set(bench.GPU_TARGETS)
    assert {"fp32", "fp16"} <= set(result["matmul_flops"]) and result["settings"]["cuda"]["cudnn_benchmark"]
    for part in ("train_2d", "train_3d"):
        section = result[part]
        assert section["peak_memory_mb"] > 0 and section["peak_share_of_reserve"] > 0
        assert section["channels_last_speedup"] > 0 and section["faster_memory_format"] in ("channels_last",
                                                                                              "contiguous")
    assert result["sampling_3d"]["host_share_of_step"] > 0 and result["sampling_3d"]["device_share_of_step"] > 0
    if result["infer_3d"]["max_abs_diff_vs_monai"] is not None:  # our sliding window on the GPU agrees with MONAI's
        assert result["infer_3d"]["max_abs_diff_vs_monai"] < 2e-2
    assert "| sampling_3d: share of a 3D step, scans in host memory |" in capsys.readouterr().out


def test_readme_states_the_gpu_targets():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### On a GPU: targets, not yet measured", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)`[^|]*\| ([<>=]+ [\d.]+) \| not yet \|$", section, flags=re.M)
    assert {path: target for path, target in rows} == {
        path: f"{comparison} {bound:g}" for path, (comparison, bound) in bench.GPU_TARGETS.items()}
