"""Segment with a trained checkpoint: evaluate a labelled split, or write masks for unlabelled images.

    python predict.py --checkpoint RUN/best.pt --data-dir DIR [--split test] --out OUT [--tta]
    python predict.py --checkpoint RUN/best.pt --input FILE_OR_DIR --out OUT

The model is rebuilt from the checkpoint alone. Masks are uint8 NIfTI files with the input's affine and
header, so a viewer overlays them on the input exactly. With --data-dir, OUT also gets metrics.csv,
summary.json, summary.md, dice_boxplot.png, overlay_<class>.png and montage.png (see report.py).
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
import report
import review
import utils
import weekly
from modules import UNet

log = logging.getLogger("hipmri.predict")


class InputError(Exception):
    """Bad command-line input (missing file, not NIfTI, output over input); the message says what to fix."""


def get_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RUN/best.pt (or last.pt) written by train.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="HipMRI root (2D or 3D layout): evaluate --split against its labels")
    source.add_argument("--input", help="a NIfTI image or a folder of them (no labels needed): write masks only")
    parser.add_argument("--split", default="test", choices=dataset.SPLITS, help="split to evaluate (default: test)")
    parser.add_argument("--split-file", help="3D: the run's split.json (default: beside the checkpoint)")
    parser.add_argument("--out", required=True, help="output folder (must not be the input folder)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation over the training flip axes")
    parser.add_argument("--lcc", nargs="*", default=None, metavar="CLASS",
                        help="keep the largest connected component of these classes (no names: all organs: "
                             "bladder rectum prostate)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16/fp16 autocast where the device supports it (default: on)")
    parser.add_argument("--overlap", type=float, default=0.5, help="3D sliding-window overlap (default: 0.5)")
    parser.add_argument("--batch-size", type=int, default=4, help="slices (2D) or windows (3D) per forward pass")
    parser.add_argument("--save-probs", action="store_true",
                        help="also write softmax probabilities (float32 NIfTI, classes on the last axis)")
    parser.add_argument("--save-uncertainty", action="store_true",
                        help="also write the per-voxel entropy of the softmax / log(classes), 0..1 (float32 NIfTI, "
                             "<mask name>_entropy.nii.gz)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: the best available)")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU (glibc): reuse freed memory instead of faulting it in again (default: on)")
    parser.add_argument("--cache-dir", help="decoded-data cache (default: ~/.cache/hipmri-seg or $HIPMRI_CACHE)")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


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
    if path.name.endswith(".gz"):
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
            write_nifti(out / name.replace(".nii", "_probs.nii"), channels_last, reference)
        written.append(out / name)
    return written


def write_uncertainty(entropy: np.ndarray, pairs: list[dataset.Pair], spatial_dims: int, out: Path) -> None:
    """--save-uncertainty: review.entropy_map of a case as float32 NIfTI per input file, <mask name>_entropy."""
    maps = entropy if spatial_dims == 2 else entropy[None]
    for index, pair in enumerate(pairs):
        reference = nib.load(str(pair.image))
        name = (pair.label or pair.image).name.replace(".nii", "_entropy.nii")
        write_nifti(out / name, np.ascontiguousarray(maps[index].reshape(reference.shape), np.float32), reference)


# ---------------------------------------------------------------- labelled split: predict and evaluate


def evaluate_split(predictor: Predictor, args: argparse.Namespace, out: Path) -> dict:
    """Predict every case of the split, compute per-case metrics at the original resolution, write everything."""
    split_file = None
    if predictor.spatial_dims == 3:
        split_file = Path(args.split_file) if args.split_file else Path(args.checkpoint).parent / "split.json"
        if not split_file.is_file():
            raise dataset.DataError(f"{split_file}: no split file. 3D splits are drawn at training time; pass the "
                                    f"run's split.json with --split-file so the test patients are the held-out ones")
    cases = cache.load_split(args.data_dir, args.split, predictor.data_config, cache_dir=args.cache_dir,
                             split_file=split_file)
    if predictor.spatial_dims != cases.spatial_dims:
        raise InputError(f"{args.checkpoint} holds a {predictor.spatial_dims}D model but {args.data_dir} is a "
                         f"{cases.spatial_dims}D layout")
    rows, pictures = [], report.PictureCases(slice_axis=0 if predictor.spatial_dims == 2 else 1)
    masks_dir = out / "predictions"
    reviewer = review.Review(predictor.spatial_dims, weekly.usual_variation(  # weekly report, review list
        Path(args.checkpoint), args.data_dir, predictor.data_config, args.cache_dir, split_file))
    for index in tqdm(range(len(cases)), desc=f"predict {args.split}", unit="case", disable=None):
        probs = predictor.probabilities(cases.images[index], cases.original_shapes[index])
        pred = predictor.segment(probs)
        gt = original_labels(cases, index)
        # Cached 2D spacings describe the resized arrays; metrics run at the files' own resolution.
        spacing = tuple(s * n / n0 for s, n, n0 in zip(cases.spacings[index], cases.images[index].shape, gt.shape))
        rows.extend(report.case_rows(cases.keys[index], pred, gt, spacing))
        pictures.add(cases.keys[index], display_image(cases, index), gt, pred, spacing)
        write_case_masks(pred, probs if args.save_probs else None, cases.sources[index], predictor.spatial_dims,
                         masks_dir)
        reviewer.add(cases.sources[index][0], pred, probs, spacing)  # review.py
        if args.save_uncertainty:
            write_uncertainty(review.entropy_map(probs), cases.sources[index], predictor.spatial_dims, masks_dir)
    summary = report.write_reports(rows, pictures, out, title=f"{args.split} split of {args.data_dir}")
    reviewer.write(out, rows)  # weekly.csv, weekly.png, review.csv, summary.md sections
    log.info("wrote %d masks to %s", sum(len(s) for s in cases.sources), masks_dir)
    return summary


def original_labels(cases: cache.CaseSet, index: int) -> np.ndarray:
    """The case's labels at the resolution of its files (2D slices resized for training are read again)."""
    label = cases.labels[index]
    if label is not None and tuple(label.shape) == tuple(cases.original_shapes[index]):
        return np.asarray(label)
    return np.stack([dataset.read_label(pair.label, cases.spatial_dims) for pair in cases.sources[index]])


def display_image(cases: cache.CaseSet, index: int) -> np.ndarray:
    """The normalised image at the original resolution, for overlays."""
    image = np.asarray(cases.images[index], dtype=np.float32)
    shape = tuple(cases.original_shapes[index])
    if image.shape != shape:
        image = dataset.resize_slices(image, shape[1:], is_label=False)
    return image


# ---------------------------------------------------------------- unlabelled images


def list_inputs(input_path: Path, out: Path) -> list[Path]:
    if not input_path.exists():
        raise InputError(f"--input {input_path}: no such file or folder")
    files = [input_path] if input_path.is_file() else sorted(
        p for p in input_path.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise InputError(f"--input {input_path}: no .nii or .nii.gz files in this folder")
    for path in files:
        if not path.name.endswith((".nii", ".nii.gz")):
            raise InputError(f"--input {path}: not a NIfTI file (.nii or .nii.gz)")
    if out.resolve() in {p.parent.resolve() for p in files}:
        raise InputError(f"--out {out} is the input folder: the masks would overwrite the images; choose another")
    return files


def segment_files(predictor: Predictor, files: list[Path], out: Path, save_probs: bool, reviewer: review.Review,
                  save_uncertainty: bool = False) -> None:
    """Masks (same file names, input geometry) for images without labels."""
    for path in tqdm(files, desc="segment", unit="file", disable=None):
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
    log.info("wrote %d masks to %s", len(files), out)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    utils.setup_logging(args.verbose)
    out = Path(args.out)
    try:
        files = list_inputs(Path(args.input), out) if args.input else None
        predictor = load_predictor(args)
        out.mkdir(parents=True, exist_ok=True)
        if files is not None:
            reviewer = review.Review(predictor.spatial_dims, weekly.usual_variation(Path(args.checkpoint)))
            segment_files(predictor, files, out, args.save_probs, reviewer, args.save_uncertainty)
            reviewer.write(out)  # weekly.csv, weekly.png, review.csv, summary.md (scans named as in layouts.NAMINGS)
        else:
            summary = evaluate_split(predictor, args, out)
            print(report.markdown_table(summary))
    except (InputError, dataset.DataError, utils.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
