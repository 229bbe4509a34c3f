"""One command for a GPU node (`make gpu-check`): the CUDA tests, a quick GPU benchmark, one pass/fail table.

    python tools/gpu_check.py [--out runs/gpu-check] [--tests-timeout 360] [--bench-timeout 210]

Runs `python -m pytest -m cuda` (tests/test_cuda.py and every other test marked `cuda`) and then
`python bench.py --device cuda --quick`, each in its own process under a time limit (together under 10 minutes),
and prints one row per test and one for the benchmark. Logs, the tests' JUnit XML and the benchmark's JSON go to
--out. Exit code 0 when every check passed; the benchmark's GPU targets are reported, not judged (see README,
"Speed"). Without a CUDA device it says so and exits 0, running nothing: the CUDA tests would all be skipped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    check: str
    result: str  # pass | FAIL | ERROR | skip | TIMEOUT
    seconds: float
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.result in ("FAIL", "ERROR", "TIMEOUT")


def run_logged(command: list[str], log_path: Path, timeout: float) -> tuple[int | None, float]:
    """(exit code, or None after `timeout` seconds; wall seconds), with stdout and stderr written to `log_path`."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - started


def junit_rows(path: Path) -> list[Row]:
    """One Row per test case of a pytest JUnit XML file."""
    rows = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        result = {None: "pass", "failure": "FAIL", "error": "ERROR", "skipped": "skip"}[
            None if outcome is None else outcome.tag]
        message = "" if outcome is None else outcome.get("message") or ""
        detail = message.splitlines()[0][:100] if message else ""
        name = f"{case.get('file') or case.get('classname', '').replace('.', '/') + '.py'}::{case.get('name')}"
        rows.append(Row(name, result, float(case.get("time", 0)), detail))
    return rows


def cuda_tests(out: Path, timeout: float, selection: list[str] | None = None) -> list[Row]:
    """Run the tests marked `cuda` (or `selection`: pytest arguments) in a fresh process; one Row per test."""
    xml = out / "cuda-tests.xml"
    xml.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={xml}", *(selection or ["-m", "cuda"])]
    code, seconds = run_logged(command, out / "cuda-tests.log", timeout)
    if code is None:
        return [Row("python -m pytest -m cuda", "TIMEOUT", seconds, f"over {timeout:.0f} s; see cuda-tests.log")]
    rows = junit_rows(xml) if xml.exists() else []
    if code not in (0, 5) and not any(row.failed for row in rows):  # pytest itself failed (5: nothing collected)
        rows.append(Row("python -m pytest -m cuda", "ERROR", seconds, f"exit code {code}; see cuda-tests.log"))
    return rows or [Row("python -m pytest -m cuda", "FAIL", seconds, "no test marked cuda was collected")]


def bench_check(out: Path, timeout: float) -> Row:
    """`bench.py --device cuda --quick` in a fresh process: passes when it runs to the end; the detail counts the
    GPU targets met (figures in bench-cuda.json)."""
    import json

    result_path = out / "bench-cuda.json"
    command = [sys.executable, "bench.py", "--device", "cuda", "--quick", "--out", str(result_path)]
    code, seconds = run_logged(command, out / "bench-cuda.log", timeout)
    name = "bench.py --device cuda --quick"
    if code is None:
        return Row(name, "TIMEOUT", seconds, f"over {timeout:.0f} s; see bench-cuda.log")
    if code != 0:
        return Row(name, "FAIL", seconds, f"exit code {code}; see bench-cuda.log")
    targets = json.loads(result_path.read_text())["targets"].values()
    met = sum(t["met"] is True for t in targets)
    measured = sum(t["met"] is not None for t in targets)
    return Row(name, "pass", seconds, f"GPU targets met: {met} of {measured} measured; table in bench-cuda.log")


def table(rows: list[Row]) -> str:
    lines = ["| check | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {r.check} | {r.result} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in rows]
    counts = {result: sum(r.result == result for r in rows) for result in ("pass", "FAIL", "ERROR", "TIMEOUT", "skip")}
    lines.append("")
    lines.append(", ".join(f"{n} {result}" for result, n in counts.items() if n))
    return "\n".join(lines)


def describe_gpu() -> str | None:
    """One line naming the GPU torch sees, or None when it sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    return (f"{torch.cuda.get_device_name()} (compute capability {capability}, {free / 1e9:.1f} of "
            f"{total / 1e9:.1f} GB free; {torch.cuda.device_count()} visible), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="logs and results")
    parser.add_argument("--tests-timeout", type=float, default=360, help="seconds for the CUDA tests (default 360)")
    parser.add_argument("--bench-timeout", type=float, default=210, help="seconds for the benchmark (default 210)")
    args = parser.parse_args(argv)
    gpu = describe_gpu()
    if gpu is None:
        import torch

        build = torch.version.cuda or "no"
        print(f"gpu-check: no CUDA device visible to torch {torch.__version__} (CUDA build: {build}), so nothing was "
              "run: the CUDA tests need a GPU. Run `make gpu-check` on a GPU node (in a Slurm job: srun --gres=gpu:1 "
              "make gpu-check); `make test` runs everything else.")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {gpu}; logs in {args.out}", flush=True)
    rows = cuda_tests(args.out, args.tests_timeout)
    print(f"CUDA tests done ({sum(r.seconds for r in rows):.0f} s in tests); benchmark next", flush=True)
    rows.append(bench_check(args.out, args.bench_timeout))
    print(table(rows))
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
