"""Regenerate the README's pictures and tables from real runs (`make readme` runs the demo and the benchmark first).

    python tools/update_readme.py --run demo/run2d [--bench bench.json]

Copies RUN/progress.png and RUN/test/{overlay_prostate,montage}.png into images_for_README/, redraws the
phantom preview, and rewrites the README blocks between `<!-- results:begin -->` / `<!-- results:end -->`
(from RUN/test/summary.md, RUN/metrics.csv and RUN/config.json) and `<!-- speed:begin -->` / `<!-- speed:end -->`
(from bench.json). Nothing in those blocks is typed by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# tools/ is not a package: put the repo root on the path so the project's flat modules import.
sys.path.insert(0, str(REPO))

import phantom  # noqa: E402
import utils  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import peer_recipe  # noqa: E402

IMAGES = REPO / "images_for_README"


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", flags=re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def results_block(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        history = list(csv.DictReader(f))
    best = utils.best_epoch_row(history)
    summary = (run / "test" / "summary.md").read_text().split("\n", 2)[2]  # drop the title line
    summary = summary.split("\n## ", 1)[0]  # the metrics table; the weekly and review sections are for the run
    budget = f"--max-minutes {config['max_minutes']:g}" if config.get("max_minutes") else f"--epochs {config['epochs']}"
    return (f"## Results on the phantom\n\nThe default 2D recipe, trained on this project's 2-core CPU with "
            f"`python train.py {budget}` ({len(history)} epochs; best validation mean foreground Dice "
            f"{float(best['dice_mean_fg']):.4f} at epoch {best['epoch']}), then evaluated on the phantom's held-out "
            f"test patients with `python predict.py --checkpoint RUN/best.pt --split test` (`make demo` runs "
            f"the same):\n\n{summary}\n"
            "Phantom numbers show that the pipeline learns and measures correctly; they are not clinical results "
            "and say little about real HipMRI scans.\n")


def recipe_block(ours: Path, peer: Path) -> str:
    config = json.loads((ours / "config.json").read_text())
    table, _ = peer_recipe.compare_table(ours, peer)
    table = table.replace(f" ({ours})", "").replace(f" ({peer})", "")  # where the runs lay on our disk is noise
    return (f"### Against a plain MONAI recipe, same data and wall-clock budget\n\n"
            f"Both trained for {config.get('max_minutes'):g} minutes on this CPU, one thread each, side by side "
            f"(`python train.py --max-minutes {config.get('max_minutes'):g}` and `python tools/peer_recipe.py "
            f"--max-minutes {config.get('max_minutes'):g}`, compared with `python tools/peer_recipe.py --compare "
            f"OURS PEER`). The peer is MONAI's BasicUNet of the same size with DiceCELoss, Adam 1e-3, batch 8, fp32 "
            f"and no augmentation; scores are our validation metric:\n\n{table}\n")


def speed_block(bench_path: Path) -> str:
    import bench

    results = json.loads(bench_path.read_text())
    return (f"## Speed\n\nMeasured by `python bench.py` on this project's 2-core machine (device {results['device']}) "
            f"(ratios within one run; absolute times on shared machines are noise):\n\n"
            f"{bench.markdown_table(results)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "demo" / "run2d", help="a 2D run evaluated into RUN/test")
    parser.add_argument("--bench", type=Path, help="bench.json from `python bench.py --out bench.json`")
    parser.add_argument("--peer", type=Path, help="a tools/peer_recipe.py run with the same budget as --run")
    args = parser.parse_args(argv)
    readme = (REPO / "README.md").read_text()
    shutil.copy(args.run / "progress.png", IMAGES / "progress.png")
    for name in ("overlay_prostate.png", "montage.png"):
        shutil.copy(args.run / "test" / name, IMAGES / name)
    phantom.write_preview(IMAGES / "phantom_preview.png", seed=0)
    readme = replace_block(readme, "results", results_block(args.run))
    if args.bench is not None:
        readme = replace_block(readme, "speed", speed_block(args.bench))
    if args.peer is not None:
        readme = replace_block(readme, "recipe", recipe_block(args.run, args.peer))
    utils.atomic_write_text(REPO / "README.md", readme)
    print(f"updated README.md and {IMAGES.name}/ from {args.run}" + (f" and {args.bench}" if args.bench else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
