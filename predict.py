"""Segment with a trained checkpoint, or score masks made by anything. Three modes:

  evaluate a split   python predict.py --checkpoint RUN/best.pt --data-dir DIR [--split test] --out OUT [--tta]
  unlabelled images  python predict.py --checkpoint RUN/best.pt --input FILE_OR_DIR --out OUT
  score masks        python predict.py --score PRED_DIR --data-dir DIR [--split test] [--split-file RUN/split.json]
                     --out OUT

With --checkpoint the model is rebuilt from the checkpoint alone. Masks are uint8 NIfTI files with the input's
affine and header, so a viewer overlays them on the input exactly. With --input FOLDER every good file gets its
mask, every file that fails is listed at the end with its reason, and the exit code is 2 if any failed.

--score judges masks from anywhere (nnU-Net, MONAI, a rater, another run of ours) against the split's labels
with the same metrics and reports as evaluating a split; no checkpoint is needed. PRED_DIR holds, per scan,
either one mask per 2D slice file, named like its label or image file (seg_004_week_0_slice_7.nii.gz or
case_004_week_0_slice_7.nii.gz), or one volume per scan named like its 3D label or image file or its case
(Case_004_Week0_SEMANTIC_LFOV.nii.gz, Case_004_Week0_LFOV.nii.gz, Case_004_Week0.nii.gz; 2D: case_004_week_0.nii.gz).
A 2D scan's volume holds its slices stacked on the MIDDLE axis in slice order, (H, n_slices, W) with slice j =
vol[:, j, :], as `dataset.py export-nnunet` writes each scan for nnU-Net, with the label slices' geometry stacked
the same way. Each mask must match its label's shape and geometry (orientation, spacing, origin) and hold class
numbers 0..5; a missing, extra, misaligned or mis-shaped mask is an error naming the file. 3D splits are the
run's: pass its split.json with --split-file.

Evaluating (a split or --score) writes metrics.csv, summary.json, summary.md, dice_boxplot.png,
overlay_<class>.png and montage.png into OUT (see report.py); a split's own masks go to OUT/predictions/.
With --checkpoint, OUT also gets the weekly report and the review list (weekly.csv, weekly.png, review.csv and
their summary.md sections; see weekly.py and review.py).
"""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import cache
import dataset
import inference
import layouts
import report
import review
import scoring
import utils
import weekly
from modules import UNet

log = logging.getLogger("hipmri.predict")

PREDICTIONS_DIR = "predictions"  # where evaluating a split writes its masks, inside OUT

USAGE = """
  %(prog)s --checkpoint RUN/best.pt --data-dir DIR [--split test] --out OUT [options]  # evaluate a split
  %(prog)s --checkpoint RUN/best.pt --input FILE_OR_DIR --out OUT [options]  # unlabelled images
  %(prog)s --score PRED_DIR --data-dir DIR [--split test] [--split-file RUN/split.json] --out OUT  # score masks"""


class InputError(Exception):
    """Bad command-line input (missing file, not NIfTI, output over input); the message says what to fix."""


def build_parser() -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    """The parser, and the options that only mean something with --checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__, usage=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_argument_group("mode (one of)").add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", metavar="RUN/best.pt",
                      help="a checkpoint written by train.py (best.pt or last.pt): predict with this model")
    mode.add_argument("--score", metavar="PRED_DIR",
                      help="judge the masks in this folder (or its predictions/ subfolder) against --data-dir's "
                           "labels; no model. Namings and the 2D volume axis order: see above")
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data-dir", metavar="DIR",
                        help="HipMRI root (2D or 3D layout): evaluate --split against its labels")
    source.add_argument("--input", metavar="FILE_OR_DIR",
                        help="with --checkpoint: a NIfTI image or a folder of them (no labels needed): masks only. "
                             "Non-NIfTI files in the folder are ignored")
    data.add_argument("--dims", type=int, choices=(2, 3),
                      help="with --score: which layout of a --data-dir that holds both (the cluster copy); "
                           "with --checkpoint it comes from the checkpoint")
    data.add_argument("--split", default="test", choices=dataset.SPLITS, help="split to evaluate (default: test)")
    data.add_argument("--split-file", metavar="RUN/split.json",
                      help="3D: the run's split.json (default with --checkpoint: beside it; required with --score)")
    data.add_argument("--out", required=True, metavar="OUT", help="output folder (must not be the input folder)")
    data.add_argument("--cache-dir", metavar="DIR",
                      help="decoded-data cache (default: ~/.cache/hipmri-seg or $HIPMRI_CACHE)")
    group = parser.add_argument_group("prediction (with --checkpoint)")
    prediction_options = [
        group.add_argument("--tta", action="store_true",
                           help="mirror test-time augmentation over the training flip axes"),
        group.add_argument("--lcc", nargs="*", default=None, metavar="CLASS",
                           help="keep the largest connected component of these classes (no names: all organs: "
                                "bladder rectum prostate)"),
        group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                           help="bf16/fp16 autocast where the device supports it (default: on)"),
        group.add_argument("--overlap", type=float, default=0.5, help="3D sliding-window overlap (default: 0.5)"),
        group.add_argument("--batch-size", type=int, default=4, help="slices (2D) or windows (3D) per forward pass"),
        group.add_argument("--save-probs", action="store_true",
                           help="also write softmax probabilities (float32 NIfTI, classes on the last axis)"),
        group.add_argument("--save-uncertainty", action="store_true",
                           help="also write the per-voxel entropy of the softmax / log(classes), 0..1 (float32 NIfTI, "
                                "<mask name>_entropy.nii.gz)"),
        group.add_argument("--device", help="cpu | cuda | cuda:N (default: the best available)"),
        group.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                           help="CPU (glibc): reuse freed memory instead of faulting it in again (default: on)"),
    ]
    parser.add_argument("--verbose", action="store_true")
    return parser, prediction_options


def get_args(argv: list[str] | None) -> argparse.Namespace:
    parser, prediction_options = build_parser()
    args = parser.parse_args(argv)
    if args.score is not None:
        if args.data_dir is None:
            parser.error("--score needs --data-dir DIR: the labels the masks are judged against")
        changed = [a.option_strings[0] for a in prediction_options if getattr(args, a.dest) != a.default]
        if changed:
            parser.error(f"{', '.join(changed)}: prediction options need --checkpoint; --score only judges masks")
    elif args.data_dir is None and args.input is None:
        parser.error("--checkpoint needs --data-dir DIR (evaluate a split) or --input FILE_OR_DIR (unlabelled images)")
    return args


@dataclass
class Predictor:
    """A model rebuilt from a checkpoint plus the settings every case is predicted with."""
    model: torch.nn.Module
    spatial_dims: int
    patch_size: tuple[int, ...] | None
    data_config: dataset.DataConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    tta_axes: tuple[int, ...]
    batch_size: int
    overlap: float
    lcc_classes: tuple[int, ...]

    def probabilities(self, image: np.ndarray, original_shape: tuple[int, ...]) -> torch.Tensor:
        """Softmax (num_classes, *original_shape) for one preprocessed case (2D: mapped back from the target size)."""
        probs = inference.predict_case(self.model, image, self.spatial_dims, patch_size=self.patch_size,
                                       device=self.device, amp_dtype=self.amp_dtype, tta_axes=self.tta_axes,
                                       batch_size=self.batch_size, overlap=self.overlap,
                                       memory_format=utils.channels_last_format(self.spatial_dims))
        if tuple(probs.shape[1:]) != tuple(original_shape):  # 2D slices resized for the model: bilinear back
            probs = F.interpolate(probs.transpose(0, 1), size=tuple(original_shape[1:]), mode="bilinear",
                                  align_corners=False).transpose(0, 1)
        return probs

    def segment(self, probs: torch.Tensor) -> np.ndarray:
        labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
        for label in self.lcc_classes:
            keep_largest_component(labels, label)
        return labels


def load_predictor(args: argparse.Namespace) -> Predictor:
    ckpt = utils.load_checkpoint(args.checkpoint)
    device = utils.choose_device(args.device)
    if args.keep_freed_memory:
        utils.keep_freed_memory(device)
    model = UNet(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    spatial_dims = ckpt["model_args"]["spatial_dims"]
    model = model.to(device, memory_format=utils.channels_last_format(spatial_dims)).eval()
    config = ckpt["config"]
    # Mirror TTA over the axes training flipped (the augmentation's default flip axes).
    tta_axes = tuple(augment.AugmentConfig().flip_axes[:spatial_dims]) if args.tta else ()
    data_config = dataset.DataConfig(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in ckpt["data_config"].items()})
    organs = args.lcc or ("bladder", "rectum", "prostate")
    lcc = () if args.lcc is None else tuple(class_index(name) for name in organs)
    patch_size = tuple(config["patch_size"]) if spatial_dims == 3 else None
    predictor = Predictor(model, spatial_dims, patch_size, data_config, device, utils.amp_dtype_for(device, args.amp),
                          tta_axes, args.batch_size, args.overlap, lcc)
    log.info("%s: %dD UNet from epoch %d (best validation mean foreground Dice %.4f), device %s, amp %s, tta axes %s",
             args.checkpoint, spatial_dims, ckpt["counters"]["epoch"], ckpt["counters"]["best_dice"], device,
             predictor.amp_dtype or "off", tta_axes or "none")
    return predictor


def class_index(name: str) -> int:
    if name not in utils.CLASS_NAMES[1:]:
        raise InputError(f"--lcc {name}: choose from {', '.join(utils.CLASS_NAMES[1:])}")
    return utils.CLASS_NAMES.index(name)


def keep_largest_component(labels: np.ndarray, label: int) -> None:
    """In place: voxels of `label` outside its largest connected component become background."""
    components, count = ndi.label(labels == label)
    if count > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        labels[(components > 0) & (components != sizes.argmax())] = 0


# ---------------------------------------------------------------- NIfTI output


def write_nifti(path: Path, data: np.ndarray, reference: nib.spatialimages.SpatialImage) -> None:
    """Atomically write `data` with the reference image's affine and header (dtype and scaling set for `data`)."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    if hasattr(header, "set_slope_inter"):
        header.set_slope_inter(1.0, 0.0)
    image = type(reference)(data, reference.affine, header)
    payload = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
    utils.atomic_write_bytes(path, payload)


def write_case_masks(case_labels: np.ndarray, probs: torch.Tensor | None, pairs: list[dataset.Pair],
                     spatial_dims: int, out: Path) -> list[Path]:
    """One mask per input file (2D: per slice, named after its seg_ file; 3D: per volume), input geometry."""
    slices = case_labels if spatial_dims == 2 else case_labels[None]
    written = []
    for index, pair in enumerate(pairs):
        reference = nib.load(str(pair.image))
        name = (pair.label or pair.image).name
        mask = slices[index].reshape(reference.shape)  # restores a trailing singleton axis if the input had one
        write_nifti(out / name, np.ascontiguousarray(mask, dtype=np.uint8), reference)
        if probs is not None:
            case_probs = probs[:, index] if spatial_dims == 2 else probs
            channels_last = np.moveaxis(case_probs.cpu().numpy(), 0, -1)
            write_nifti(out / scoring.side_name(name, "probs"), channels_last, reference)
        written.append(out / name)
    return written


def write_uncertainty(entropy: np.ndarray, pairs: list[dataset.Pair], spatial_dims: int, out: Path) -> None:
    """--save-uncertainty: review.entropy_map of a case as float32 NIfTI per input file, <mask name>_entropy."""
    maps = entropy if spatial_dims == 2 else entropy[None]
    for index, pair in enumerate(pairs):
        reference = nib.load(str(pair.image))
        name = scoring.side_name((pair.label or pair.image).name, "entropy")
        write_nifti(out / name, np.ascontiguousarray(maps[index].reshape(reference.shape), np.float32), reference)


# ---------------------------------------------------------------- labelled split: predict and evaluate


def split_file_for(data_dir: str, spatial_dims: int | None, given: str | None,
                   default: Path | None) -> Path | None:
    """The split.json a 3D evaluation must use (None for the 2D layout, whose splits are folders)."""
    if dataset.detect_layout(data_dir, spatial_dims) == "2d":
        if given is not None:
            log.warning("--split-file %s ignored: the 2D layout's splits are its folders", given)
        return None
    if given is None and default is None:
        raise InputError("--score with 3D data needs --split-file RUN/split.json: 3D splits are drawn at training "
                         "time, and masks are judged on the patients that run held out")
    split_file = Path(given) if given else default
    if not split_file.is_file():
        raise InputError(f"{split_file}: no split file. 3D splits are drawn at training time; pass the run's "
                         f"split.json with --split-file so the test patients are the held-out ones")
    return split_file


def evaluate_split(predictor: Predictor, args: argparse.Namespace, out: Path) -> dict:
    """Predict every case of the split, compute per-case metrics at the original resolution, write everything."""
    split_file = None
    if predictor.spatial_dims == 3:
        split_file = split_file_for(args.data_dir, 3, args.split_file, Path(args.checkpoint).parent / "split.json")
    cases = cache.load_split(args.data_dir, args.split, predictor.data_config, cache_dir=args.cache_dir,
                             split_file=split_file, spatial_dims=predictor.spatial_dims)
    if predictor.spatial_dims != cases.spatial_dims:
        raise InputError(f"{args.checkpoint} holds a {predictor.spatial_dims}D model but {args.data_dir} is a "
                         f"{cases.spatial_dims}D layout")
    evaluation = report.Evaluation(scoring.slice_axis(predictor.spatial_dims))
    masks_dir = out / PREDICTIONS_DIR
    reviewer = review.Review(predictor.spatial_dims, weekly.usual_variation(  # weekly report, review list
        Path(args.checkpoint), args.data_dir, predictor.data_config, args.cache_dir, split_file))
    for index in tqdm(range(len(cases)), desc=f"predict {args.split}", unit="case", disable=None):
        probs = predictor.probabilities(cases.images[index], cases.original_shapes[index])
        pred = predictor.segment(probs)
        spacing = scoring.evaluate_case(evaluation, cases, index, pred)
        write_case_masks(pred, probs if args.save_probs else None, cases.sources[index], predictor.spatial_dims,
                         masks_dir)
        reviewer.add(cases.sources[index][0], pred, probs, spacing)
        if args.save_uncertainty:
            write_uncertainty(review.entropy_map(probs), cases.sources[index], predictor.spatial_dims, masks_dir)
    summary = evaluation.write(out, title=f"{args.split} split of {args.data_dir}")
    reviewer.write(out, evaluation.rows)  # weekly.csv, weekly.png, review.csv, summary.md sections
    log.info("wrote %d masks to %s", sum(len(s) for s in cases.sources), masks_dir)
    return summary


# ---------------------------------------------------------------- unlabelled images


def list_inputs(input_path: Path, out: Path) -> list[Path]:
    """The NIfTI files to segment: `input_path` itself, or the folder's NIfTI files (other files are ignored)."""
    if not input_path.exists():
        raise InputError(f"--input {input_path}: no such file or folder")
    if input_path.is_file():
        if not layouts.is_nifti(input_path.name):
            raise InputError(f"--input {input_path}: not a NIfTI file (.nii or .nii.gz)")
        files = [input_path]
    else:
        entries = sorted(p for p in input_path.iterdir() if p.is_file())
        files = [p for p in entries if layouts.is_nifti(p.name)]
        if not files:
            raise InputError(f"--input {input_path}: no .nii or .nii.gz files in this folder")
        if len(entries) > len(files):
            log.info("--input %s: ignoring %d file(s) that are not NIfTI", input_path, len(entries) - len(files))
    if out.resolve() in {p.parent.resolve() for p in files}:
        raise InputError(f"--out {out} is the input folder: the masks would overwrite the images; choose another")
    return files


def segment_file(predictor: Predictor, path: Path, out: Path, save_probs: bool, reviewer: review.Review,
                 save_uncertainty: bool = False) -> None:
    """The mask of one image without a label (same file name, input geometry); DataError if it cannot be read."""
    image, reference = dataset.read_image(path)
    if image.ndim != predictor.spatial_dims:
        raise dataset.DataError(f"{path}: a {image.ndim}D image (shape {image.shape}) but the checkpoint holds a "
                                f"{predictor.spatial_dims}D model; use a {image.ndim}D checkpoint")
    # Exactly the training preprocessing: a 2D slice file is a stack of one slice.
    stack = image[None] if predictor.spatial_dims == 2 else image
    original_shape = stack.shape
    stack = dataset.preprocess_image(stack, predictor.spatial_dims, predictor.data_config)
    probs = predictor.probabilities(stack, original_shape)
    pair = dataset.Pair(key=path.name, case_id="", week=0, slice_index=None, image=path, label=None)
    pred = predictor.segment(probs)
    write_case_masks(pred, probs if save_probs else None, [pair], predictor.spatial_dims, out)
    reviewer.add_file(path, pred, probs, reference)  # review.py: grouped into scans and patients by name
    if save_uncertainty:
        write_uncertainty(review.entropy_map(probs), [pair], predictor.spatial_dims, out)


def segment_files(predictor: Predictor, files: list[Path], out: Path, save_probs: bool, reviewer: review.Review,
                  save_uncertainty: bool = False) -> list[str]:
    """Masks for every file that can be segmented; returns one message per file that could not (naming it).
    A file that fails leaves no mask: masks are written atomically, after the prediction."""
    failures = []
    for path in tqdm(files, desc="segment", unit="file", disable=None):
        try:
            segment_file(predictor, path, out, save_probs, reviewer, save_uncertainty)
        except dataset.DataError as exc:
            failures.append(str(exc))
        except (OSError, ValueError, RuntimeError) as exc:  # e.g. out of memory for one huge volume, a full disk
            failures.append(f"{path}: {type(exc).__name__}: {exc}")
    return failures


# ---------------------------------------------------------------- --score: masks made by anything


def mask_folder(pred_dir: Path) -> Path:
    """PRED_DIR, or its predictions/ subfolder when PRED_DIR is one of our prediction folders."""
    if not pred_dir.is_dir():
        raise InputError(f"--score {pred_dir}: no such folder")
    if not any(layouts.is_nifti(p.name) for p in pred_dir.iterdir()) and (pred_dir / PREDICTIONS_DIR).is_dir():
        log.info("--score %s: no masks here; scoring %s", pred_dir, pred_dir / PREDICTIONS_DIR)
        return pred_dir / PREDICTIONS_DIR
    return pred_dir


def score_masks(args: argparse.Namespace, out: Path) -> dict:
    """Judge the masks in args.score against the labels of args.split with the metrics and reports of
    evaluate_split. All masks are checked first: every problem is listed in one DataError, nothing is written."""
    pred_dir = mask_folder(Path(args.score))
    split_file = split_file_for(args.data_dir, args.dims, args.split_file, None)
    cases = cache.load_split(args.data_dir, args.split, dataset.DataConfig(), cache_dir=args.cache_dir,
                             split_file=split_file, spatial_dims=args.dims)
    preds = scoring.load_masks(pred_dir, cases)
    evaluation = report.Evaluation(scoring.slice_axis(cases.spatial_dims))
    for index in tqdm(range(len(cases)), desc=f"score {args.split}", unit="scan", disable=None):
        scoring.evaluate_case(evaluation, cases, index, preds[index])
    out.mkdir(parents=True, exist_ok=True)
    return evaluation.write(out, title=f"masks in {pred_dir} against the {args.split} split of {args.data_dir}")


# ---------------------------------------------------------------- main


def predict(args: argparse.Namespace, out: Path) -> int:
    """--checkpoint modes: evaluate a split, or segment unlabelled files (exit 2 if any of them failed)."""
    files = list_inputs(Path(args.input), out) if args.input else None
    predictor = load_predictor(args)
    out.mkdir(parents=True, exist_ok=True)
    if files is None:
        print(report.markdown_table(evaluate_split(predictor, args, out)))
        return 0
    reviewer = review.Review(predictor.spatial_dims, weekly.usual_variation(Path(args.checkpoint)))
    failures = segment_files(predictor, files, out, args.save_probs, reviewer, args.save_uncertainty)
    reviewer.write(out)  # weekly.csv, weekly.png, review.csv, summary.md (scans named as in layouts.NAMINGS)
    print(f"segmented {len(files) - len(failures)} of {len(files)} file(s) into {out}; {len(failures)} failed")
    if failures:
        print(f"error: no mask for {len(failures)} file(s):\n" + "\n".join(f"  {text}" for text in failures),
              file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    utils.setup_logging(args.verbose)
    out = Path(args.out)
    try:
        if args.score is None:
            return predict(args, out)
        if Path(args.score).resolve() == out.resolve():
            raise InputError(f"--out {out} is the --score folder: the reports would mix with the masks; choose another")
        print(report.markdown_table(score_masks(args, out)))
    except (InputError, dataset.DataError, utils.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
