"""tools/peer_recipe.py: a budgeted smoke run on the tiny phantom writes its outputs; --compare judges the bar."""

import csv
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

import utils

REPO = Path(__file__).resolve().parents[1]
TINY = ["--features", "4", "8", "8", "8", "8", "4", "--threads", "1", "--seed", "1"]


@pytest.fixture(scope="module")
def peer_recipe():
    """tools/ is not a package: load the script as a module."""
    spec = importlib.util.spec_from_file_location("peer_recipe", REPO / "tools" / "peer_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peer_run(peer_recipe, phantom_2d_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("peer") / "peer"
    assert peer_recipe.main(["--data-dir", str(phantom_2d_dir), "--out", str(run), "--cache-dir",
                             str(run.parent / "cache"), "--max-minutes", "0.05", *TINY]) == 0
    return run


def read_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_train_py_columns_and_summary(peer_recipe, peer_run):
    for name in ("metrics.csv", "summary.json", "progress.png", "peer.log"):
        assert (peer_run / name).is_file(), name
    rows = read_rows(peer_run)
    assert list(rows[0]) == utils.METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(0 <= float(r["dice_mean_fg"]) <= 1 and math.isfinite(float(r["train_loss"])) for r in rows)
    summary = json.loads((peer_run / "summary.json").read_text())
    assert summary["epochs"] == len(rows) and summary["steps"] >= 1 and summary["samples_per_s"] > 0
    best = max(rows, key=lambda r: float(r["dice_mean_fg"]))
    assert summary["best_epoch"] == int(best["epoch"])
    assert summary["best"]["prostate"] == pytest.approx(float(best["dice_prostate"]))
    assert summary["last"]["body"] == pytest.approx(float(rows[-1]["dice_body"]))
    # 3 s budget: stops soon after it (one epoch of the tiny model plus validation fits in a few seconds).
    assert summary["minutes"] < 0.5


def test_refuses_to_overwrite_a_run(peer_recipe, peer_run, phantom_2d_dir):
    with pytest.raises(SystemExit, match="already holds a run"):
        peer_recipe.main(["--data-dir", str(phantom_2d_dir), "--out", str(peer_run), "--max-minutes", "0.01"])


def _shifted_run(source: Path, target: Path, shifts: dict) -> Path:
    """A copy of a run's metrics.csv with some Dice columns moved by fixed amounts (a fake "ours")."""
    rows = read_rows(source)
    for row in rows:
        for column, shift in shifts.items():
            row[column] = str(float(row[column]) + shift)
    target.mkdir()
    with open(target / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def test_compare_prints_table_and_judges_the_bar(peer_recipe, peer_run, tmp_path, capsys):
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(peer_run / "metrics.csv", same / "metrics.csv")
    assert peer_recipe.main(["--compare", str(same), str(peer_run)]) == 1  # a tie is not a win
    table = capsys.readouterr().out
    assert "| class | ours | peer | ours - peer |" in table and "NOT met" in table
    for name in ("body", "bone", "bladder", "rectum", "prostate"):
        assert f"| {name} |" in table
    better = {f"dice_{name}": 0.01 for name in ("body", "bone", "bladder", "rectum", "prostate")}
    short = _shifted_run(peer_run, tmp_path / "short", better)  # prostate only +0.01 < 0.05
    assert peer_recipe.main(["--compare", str(short), str(peer_run)]) == 1
    capsys.readouterr()
    winner = _shifted_run(peer_run, tmp_path / "winner", {**better, "dice_prostate": 0.06})
    assert peer_recipe.main(["--compare", str(winner), str(peer_run)]) == 0
    table = capsys.readouterr().out
    prostate = next(line for line in table.splitlines() if line.startswith("| prostate |"))
    assert prostate.split("|")[4].strip() == "+0.0600" and "): met." in table


def test_compare_names_a_missing_run(peer_recipe, tmp_path):
    with pytest.raises(SystemExit, match="metrics.csv not found"):
        peer_recipe.main(["--compare", str(tmp_path / "nowhere"), str(tmp_path / "nowhere")])
