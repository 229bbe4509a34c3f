"""tools/gpu_check.py (`make gpu-check`): says so and runs nothing without CUDA, turns a pytest run into a
pass/fail table, fails on a failed or timed-out check; and the sliding-window prediction on CUDA it runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_runs_nothing_and_exits_0(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("gpu-check ran something without CUDA"))
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA device visible" in capsys.readouterr().out and not (tmp_path / "out").exists()


SAMPLE_TESTS = '''
import pytest

def test_good():
    pass

def test_bad():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass
'''


def test_a_pytest_run_becomes_rows(gpu_check, tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE_TESTS)
    rows = gpu_check.cuda_tests(tmp_path, timeout=120, selection=[str(sample)])
    results = {row.check.split("::")[-1]: row for row in rows}
    assert {name: row.result for name, row in results.items()} == {
        "test_good": "pass", "test_bad": "FAIL", "test_skipped": "skip"}
    assert "one is not two" in results["test_bad"].detail and results["test_bad"].failed
    text = gpu_check.table(rows)
    assert "| check | result | seconds | detail |" in text and text.endswith("1 pass, 1 FAIL, 1 skip")
    assert (tmp_path / "cuda-tests.log").is_file()


def test_a_run_past_its_time_limit_fails(gpu_check, tmp_path):
    rows = gpu_check.cuda_tests(tmp_path, timeout=0.01, selection=["--version"])
    assert [row.result for row in rows] == ["TIMEOUT"] and rows[0].failed


def test_exit_code_follows_the_rows(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "describe_gpu", lambda: "a stand-in GPU")
    passed = gpu_check.Row("bench.py --device cuda --quick", "pass", 1.0)
    monkeypatch.setattr(gpu_check, "bench_check", lambda out, timeout: passed)
    for tests, expected in (([gpu_check.Row("t::a", "pass", 1.0), gpu_check.Row("t::b", "skip", 0.0)], 0),
                            ([gpu_check.Row("t::a", "ERROR", 1.0)], 1)):
        monkeypatch.setattr(gpu_check, "cuda_tests", lambda out, timeout, tests=tests: list(tests))
        assert gpu_check.main(["--out", str(tmp_path)]) == expected
        out = capsys.readouterr().out
        assert "a stand-in GPU" in out and "| bench.py --device cuda --quick | pass |" in out


@pytest.mark.cuda
def test_cuda_sliding_window_prediction_matches_the_cpu():
    from inference import predict_case
    from modules import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, features=(4, 8, 16), norm="instance").eval()
    volume = torch.randn(40, 36, 20)
    on_cpu = predict_case(model, volume, 3, (24, 24, 16), "cpu", batch_size=2)
    on_gpu = predict_case(model.cuda(), volume, 3, (24, 24, 16), "cuda", batch_size=2)
    assert on_gpu.shape == on_cpu.shape == (6, 40, 36, 20)
    # cuDNN may run fp32 convolutions as TF32 (10-bit mantissa): close, not equal
    assert (on_gpu.cpu() - on_cpu).abs().max() < 1e-2
    assert (on_gpu.argmax(0).cpu() == on_cpu.argmax(0)).float().mean() > 0.99
