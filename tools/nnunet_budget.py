"""nnU-Net v2's default training for a fixed wall-clock budget, then its weights saved for nnUNetv2_predict.

nnUNetv2_train saves a checkpoint only when an epoch (250 iterations) ends; on a CPU one epoch of the default 2D
plan takes hours, so a run stopped after minutes leaves nothing to predict with. This script runs the same
trainer (`nnUNetTrainer` with nnU-Net's plans, data augmentation, loss, optimiser and learning rate: nothing is
changed) step by step until the budget is spent, then writes `checkpoint_final.pth` where nnUNetv2_train would,
so `nnUNetv2_predict -chk checkpoint_final.pth` can use it. The budget counts training steps only (a step starts
only when one as long as the last would end within it); the set-up (network, data loaders, unpacking) is timed
apart. Run it in the environment that holds nnunetv2
(requirements-peer.txt) with nnUNet_raw, nnUNet_preprocessed and nnUNet_results set:

    python tools/nnunet_budget.py 501 2d 0 --minutes 10 --device cpu

It prints the plan's batch and patch size, the network's parameter count, seconds per iteration and the
iterations done, and writes them to budget.json beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path


def get_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="nnU-Net data set id or name, e.g. 501")
    parser.add_argument("configuration", help="plan configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("fold", type=int, help="fold of splits_final.json to train")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget for the training steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="as nnUNetv2_train -device")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    import torch  # here: --help works without nnU-Net's environment
    from nnunetv2.run.run_training import get_trainer_from_args

    if args.device == "cpu":  # as nnUNetv2_train -device cpu sets it
        torch.set_num_threads(multiprocessing.cpu_count())
    started = time.perf_counter()
    trainer = get_trainer_from_args(args.dataset, args.configuration, args.fold, device=torch.device(args.device))
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    setup_s = time.perf_counter() - started
    step_s, losses = [], []
    deadline = time.perf_counter() + 60 * args.minutes
    # Start a step only when one as long as the last still ends inside the budget.
    while time.perf_counter() + (step_s[-1] if step_s else 0) <= deadline \
            and len(step_s) < trainer.num_iterations_per_epoch * trainer.num_epochs:
        tick = time.perf_counter()
        losses.append(float(trainer.train_step(next(trainer.dataloader_train))["loss"]))
        step_s.append(time.perf_counter() - tick)
        print(f"iteration {len(step_s)}: {step_s[-1]:.1f} s, loss {losses[-1]:.4f}", flush=True)
    trainer.on_train_end()  # writes checkpoint_final.pth and stops the augmentation workers
    plan = trainer.configuration_manager
    summary = {
        "configuration": args.configuration, "fold": args.fold, "device": args.device, "budget_minutes": args.minutes,
        "batch_size": plan.batch_size, "patch_size": list(plan.patch_size),
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "setup_s": round(setup_s, 1), "iterations": len(step_s),
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "seconds_per_iteration": round(sum(step_s) / max(len(step_s), 1), 2),
        "seconds_per_iteration_after_first": round(sum(step_s[1:]) / max(len(step_s) - 1, 1), 2),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    }
    (Path(trainer.output_folder) / "budget.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
