"""The plain peer recipe of issue 5's "Recipe quality" bar, and the table that compares a run of ours with it.

The peer: MONAI BasicUNet of about our default size (1.95 M vs 1.94 M parameters) + DiceCELoss, Adam 1e-3,
batch 8 from a shuffled DataLoader, no augmentation, no schedule, fp32. It trains on exactly train.py's data
(the same cached, z-scored 256x128 slices; without --data-dir the same default phantom) for a wall-clock
budget counted as train.py counts it (training and validation, from the first step), and is validated
with our metric: hard Dice per validation case and class, slices stacked into the case's volume.

    python train.py --out runs/ours --max-minutes 10
    python tools/peer_recipe.py --out runs/peer --max-minutes 10
    python tools/peer_recipe.py --compare runs/ours runs/peer

Outputs in RUN/: metrics.csv (train.py's columns), summary.json, progress.png, peer.log.
`--compare` prints a Markdown table of the best epochs' per-class Dice and exits 0 if the bar is met, else 1.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from pathlib import Path

# tools/ is not a package: put the repo root on the path so the project's flat modules import.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cache  # noqa: E402
import dataset  # noqa: E402
import inference  # noqa: E402
import sampling  # noqa: E402
import utils  # noqa: E402
from modules import count_parameters  # noqa: E402

log = logging.getLogger("hipmri.peer")

FOREGROUND = utils.CLASS_NAMES[1:]
PEER_FEATURES = (16, 32, 64, 128, 256, 16)  # BasicUNet's 5 encoder widths (ours: 16..256) + the last decoder's
PEER_LR = 1e-3
PEER_BATCH_SIZE = 8
PROSTATE_MARGIN = 0.05  # the bar: ours beats the peer in every foreground class, the prostate by this much


# ---------------------------------------------------------------- data and model


def load_data(data_dir: Path, cache_dir: str | None, seed: int) -> tuple[cache.CaseSet, cache.CaseSet]:
    """The 2D train and validate splits, preprocessed and cached exactly as train.py loads them."""
    if dataset.detect_layout(data_dir) != "2d":
        raise SystemExit(f"{data_dir} holds the 3D layout; the peer recipe is the 2D comparison of issue 5")
    return tuple(cache.load_split(data_dir, split, dataset.DataConfig(), cache_dir=cache_dir, seed=seed)
                 for split in ("train", "validate"))


def make_loader(cases: cache.CaseSet, seed: int) -> torch.utils.data.DataLoader:
    """Plain shuffled batches of (image float32 (B, 1, H, W), label int64 (B, H, W)), seeded, in-process."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(sampling.SliceDataset(cases), batch_size=PEER_BATCH_SIZE, shuffle=True,
                                       generator=generator)


def make_model(features: tuple[int, ...]) -> torch.nn.Module:
    """MONAI BasicUNet, 2D, 1 input channel, logits (B, 6, H, W); H and W must be multiples of 16."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=utils.NUM_CLASSES, features=features)


class PeerLoss(torch.nn.Module):
    """MONAI's DiceCELoss(to_onehot_y=True, softmax=True) on logits (B, 6, *S) and labels (B, *S) int64
    (MONAI wants a channel axis on the labels; our validation passes them without one)."""

    def __init__(self):
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, labels.unsqueeze(1))


# ---------------------------------------------------------------- training and validation


class Budget:
    """Wall-clock budget from the first training step, validation included (as train.py counts it)."""

    def __init__(self, minutes: float):
        self.seconds, self.started = minutes * 60, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def spent(self) -> bool:
        return self.elapsed >= self.seconds


def train_one_epoch(model: torch.nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    loss_fn: torch.nn.Module, budget: Budget, epoch: int) -> dict:
    """One shuffled pass, stopping after the step that spends the budget: mean loss, data-wait share, throughput."""
    model.train()
    loss_sum, steps, samples, waiting = 0.0, 0, 0, 0.0
    bar = tqdm(total=len(loader), desc=f"peer epoch {epoch}", unit="batch", leave=False, disable=None)
    started = time.perf_counter()
    batches = iter(loader)
    while not budget.spent():
        waited = time.perf_counter()
        batch = next(batches, None)
        waiting += time.perf_counter() - waited
        if batch is None:
            break
        image, label = batch
        loss = loss_fn(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, steps, samples = loss_sum + loss.item(), steps + 1, samples + image.shape[0]
        bar.update()
        if steps % 10 == 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{samples / (time.perf_counter() - started):.1f}")
    bar.close()
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum / steps if steps else math.nan, "data_wait": waiting / seconds,
            "samples_per_s": samples / seconds, "steps": steps, "samples": samples, "train_seconds": seconds}


@torch.no_grad()
def evaluate(model: torch.nn.Module, cases: cache.CaseSet, loss_fn: torch.nn.Module) -> dict:
    """Our metric, exactly as train.py computes it (inference.validate_cases)."""
    return inference.validate_cases(model, cases.images, cases.labels, 2, loss_fn, batch_size=2 * PEER_BATCH_SIZE)


def fit(model: torch.nn.Module, loader: torch.utils.data.DataLoader, val_cases: cache.CaseSet,
        args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Epochs until the budget (or --max-epochs) is spent, validating after each; the history and totals."""
    optimizer = torch.optim.Adam(model.parameters(), lr=PEER_LR)
    loss_fn = PeerLoss()
    history, totals = [], {"steps": 0, "samples": 0, "train_seconds": 0.0}
    budget = Budget(args.max_minutes)
    while not budget.spent() and (args.max_epochs is None or len(history) < args.max_epochs):
        epoch, started = len(history) + 1, time.perf_counter()
        result = train_one_epoch(model, loader, optimizer, loss_fn, budget, epoch)
        for key in totals:
            totals[key] += result.pop(key)
        row = {"epoch": epoch, **result, **evaluate(model, val_cases, loss_fn), "lr": PEER_LR,
               "seconds": time.perf_counter() - started}
        history.append(row)
        utils.write_history(history, args.out)
        log.info(utils.format_epoch(row))
    totals["minutes"] = budget.elapsed / 60
    return history, totals


# ---------------------------------------------------------------- outputs


def best_row(rows: list[dict]) -> dict:
    """The epoch train.py saves as best.pt (utils.best_epoch_row); an error if no epoch was validated."""
    best = utils.best_epoch_row(rows)
    if best is None:
        raise SystemExit("no validated epoch (dice_mean_fg is NaN in every row): train for longer")
    return best


def per_class(row: dict) -> dict[str, float]:
    return {name: float(row[f"dice_{name}"]) for name in (*FOREGROUND, "mean_fg")}


def summarise_run(history: list[dict], totals: dict, args: argparse.Namespace, n_params: int) -> dict:
    """summary.json: best and last epochs' per-class validation Dice, epochs, steps, throughput, minutes."""
    best = best_row(history)
    return {"best_epoch": int(best["epoch"]), "best": per_class(best), "last": per_class(history[-1]),
            "epochs": len(history), "steps": totals["steps"],
            "samples_per_s": totals["samples"] / max(totals["train_seconds"], 1e-9), "minutes": totals["minutes"],
            "recipe": {"model": "monai BasicUNet", "features": list(args.features), "parameters": n_params,
                       "loss": "monai DiceCELoss(to_onehot_y=True, softmax=True)", "optimizer": "Adam",
                       "lr": PEER_LR, "batch_size": PEER_BATCH_SIZE, "augmentation": None, "precision": "fp32"},
            "data_dir": str(args.data_dir), "seed": args.seed, "threads": torch.get_num_threads(),
            "max_minutes": args.max_minutes}


# ---------------------------------------------------------------- comparison


def read_metrics(run: Path) -> list[dict]:
    """The rows of RUN/metrics.csv (train.py's or ours), values as strings."""
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass a run folder written by train.py or tools/peer_recipe.py")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"epoch", "dice_mean_fg", *(f"dice_{name}" for name in FOREGROUND)} - set(rows[0] if rows else {})
    if missing:
        raise SystemExit(f"{path}: no rows or missing columns {sorted(missing)}")
    return rows


def compare_table(ours: Path, peer: Path) -> tuple[str, bool]:
    """Markdown: per-class validation Dice of each run's best epoch, ours vs peer; whether the bar is met
    (every foreground class ours > peer, the prostate by >= PROSTATE_MARGIN). Last epochs shown for reference."""
    runs = {"ours": read_metrics(ours), "peer": read_metrics(peer)}
    best = {name: best_row(rows) for name, rows in runs.items()}
    last = {name: rows[-1] for name, rows in runs.items()}
    lines = [f"Validation Dice, best epoch by mean foreground Dice: ours epoch {best['ours']['epoch']} of "
             f"{len(runs['ours'])} ({ours}), peer epoch {best['peer']['epoch']} of {len(runs['peer'])} ({peer}).", "",
             "| class | ours | peer | ours - peer | ours (last) | peer (last) |", "|---|---|---|---|---|---|"]
    met = True
    for name in (*FOREGROUND, "mean_fg"):
        a, b = float(best["ours"][f"dice_{name}"]), float(best["peer"][f"dice_{name}"])
        need = PROSTATE_MARGIN if name == "prostate" else 0.0
        if name != "mean_fg":
            met = met and a - b > 0 and a - b >= need
        lines.append(f"| {name} | {a:.4f} | {b:.4f} | {a - b:+.4f} | {float(last['ours'][f'dice_{name}']):.4f} | "
                     f"{float(last['peer'][f'dice_{name}']):.4f} |")
    lines += ["", f"Bar (every foreground class ours > peer, prostate by >= {PROSTATE_MARGIN}): "
              f"{'met' if met else 'NOT met'}."]
    return "\n".join(lines), met


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="HipMRI 2D root; default: train.py's default phantom")
    parser.add_argument("--out", type=Path, help="run folder (new)")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget, validation included")
    parser.add_argument("--max-epochs", type=int, help="stop after this many epochs even within the budget")
    parser.add_argument("--seed", type=int, default=0, help="seeds the init and batch order; picks the phantom")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--features", type=int, nargs=6, default=PEER_FEATURES, metavar="N",
                        help=f"BasicUNet widths (default: {' '.join(map(str, PEER_FEATURES))}, about our default size)")
    parser.add_argument("--cache-dir", help="decoded data and the default phantom (as train.py's --cache-dir)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OURS_RUN", "PEER_RUN"),
                        help="print the comparison table of two finished runs and exit (0 if the bar is met, else 1)")
    args = parser.parse_args(argv)
    if args.compare is None and (args.out is None or args.max_minutes is None):
        parser.error("training the peer needs --out and --max-minutes (or use --compare OURS_RUN PEER_RUN)")
    return args


def run_peer(args: argparse.Namespace) -> int:
    """Train and validate the peer recipe into args.out."""
    out = Path(args.out)
    if (out / "metrics.csv").exists():
        raise SystemExit(f"{out} already holds a run (metrics.csv): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    utils.setup_logging(log_file=out / "peer.log")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data_dir = args.data_dir or cache.default_phantom(args.cache_dir, "2d", args.seed)
    utils.seed_everything(args.seed)
    train_cases, val_cases = load_data(Path(args.data_dir), args.cache_dir, args.seed)
    loader = make_loader(train_cases, args.seed)
    model = make_model(tuple(args.features))
    n_params = count_parameters(model)
    log.info("peer recipe: BasicUNet %s (%s parameters), DiceCELoss, Adam %.0e, batch %d, fp32, no augmentation, "
             "%d threads; %d train slices, %d validation cases from %s; budget %.2f min", tuple(args.features),
             f"{n_params:,}", PEER_LR, PEER_BATCH_SIZE, torch.get_num_threads(), len(loader.dataset),
             len(val_cases.keys), args.data_dir, args.max_minutes)
    history, totals = fit(model, loader, val_cases, args)
    if not history:
        raise SystemExit("the budget ended before the first epoch: raise --max-minutes")
    summary = summarise_run(history, totals, args, n_params)
    utils.write_json(out / "summary.json", summary)
    log.info("done: %d epochs, %d steps in %.1f min. Best mean foreground Dice %.4f at epoch %d (%s). Outputs in %s",
             summary["epochs"], summary["steps"], summary["minutes"], summary["best"]["mean_fg"],
             summary["best_epoch"], " ".join(f"{k}={v:.3f}" for k, v in summary["best"].items()), out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare is not None:
        table, met = compare_table(*args.compare)
        print(table)
        return 0 if met else 1
    return run_peer(args)


if __name__ == "__main__":
    raise SystemExit(main())
