"""Batches from a decoded split: `DeviceBatchSource` keeps a CaseSet's labelled scans on the training device
and samples (image, label) batches there (2D whole slices; 3D patches with foreground oversampling, then
`augment.augment_batch` on the device); `SliceDataset` serves the same 2D slices to a torch DataLoader;
`measure_read_speed` times reading a split through the cache against reading the files with nibabel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from augment import AugmentConfig, augment_batch
from cache import CaseSet, load_split
from dataset import DataError
from utils import NUM_CLASSES

__all__ = ["DeviceBatchSource", "SliceDataset", "measure_read_speed"]


def _rng(*numbers: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(n) for n in numbers]))


class DeviceBatchSource:
    """A split's labelled scans as tensors on `device`, sampled into (image, label) batches there.

    2D: samples are whole slices (B, 1, H, W). 3D: patches (B, 1, *patch_size) cut at native resolution;
    a `foreground_fraction` of each epoch's patches (rounded up) is centred on a voxel of a foreground class
    present in the scan, the class drawn uniformly, so the small prostate is seen often; the rest are placed
    uniformly. Scans smaller than the patch are padded (image with its minimum, label with 0).

    `epoch(e)` is a pure function of (seed, e, rank, world_size): a resumed run gets the same batches, and
    rank r of `world_size` takes items r, r + world_size, ... of one shared permutation, so ranks are disjoint.
    """

    MAX_CENTRES = 10_000  # per class and scan: bounds memory, still spread over the whole structure

    def __init__(self, cases: CaseSet, batch_size: int, device: torch.device | str = "cpu",
                 patch_size: Sequence[int] | None = None, foreground_fraction: float = 1 / 3, seed: int = 0,
                 rank: int = 0, world_size: int = 1, augment: AugmentConfig | None = None,
                 steps_per_epoch: int | None = None):
        labelled = [i for i, label in enumerate(cases.labels) if label is not None]
        if not labelled:
            raise DataError("DeviceBatchSource: the split has no labelled scans to train on")
        self.cases, self.spatial_dims, self.device = cases, cases.spatial_dims, torch.device(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.augment, self.foreground_fraction = augment, foreground_fraction
        if self.spatial_dims == 2:
            if patch_size is not None:
                raise ValueError("DeviceBatchSource: 2D trains on whole slices; pass patch_size=None")
            self.images = torch.from_numpy(np.concatenate([cases.images[i] for i in labelled])).to(self.device)
            self.labels = torch.from_numpy(np.concatenate([cases.labels[i] for i in labelled])).to(self.device)
            self.num_items = len(self.images)
            default_steps = self.num_items // world_size // batch_size
        else:
            if patch_size is None or len(patch_size) != 3:
                raise ValueError(f"DeviceBatchSource: 3D needs a patch_size of 3 ints, not {patch_size}")
            self.patch_size = tuple(int(p) for p in patch_size)
            self._volumes_to_device(cases, labelled)
            self.num_items = len(self.volumes)
            default_steps = 250
        if self.num_items < world_size:
            raise DataError(f"{self.num_items} training items cannot be shared by {world_size} ranks")
        self.steps = steps_per_epoch or max(1, default_steps)
        if self.spatial_dims == 2:  # a split smaller than one batch per rank still gives one (smaller) batch
            self.batch_size = min(batch_size, self.num_items // world_size)

    def _volumes_to_device(self, cases: CaseSet, labelled: list[int]) -> None:
        self.volumes, self.volume_labels, self.centres = [], [], []
        for i in labelled:
            image, label = np.array(cases.images[i]), np.array(cases.labels[i])  # copies: off the read-only mmap
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch_size, image.shape)]
            if any(after for _, after in pad):
                image = np.pad(image, pad, constant_values=image.min())
                label = np.pad(label, pad, constant_values=0)
            self.volumes.append(torch.from_numpy(np.ascontiguousarray(image)).to(self.device))
            self.volume_labels.append(torch.from_numpy(np.ascontiguousarray(label)).to(self.device))
            self.centres.append(self._class_centres(label))

    def _class_centres(self, label: np.ndarray) -> dict[int, np.ndarray]:
        """Foreground class -> flat voxel indices of that class (an even subsample of at most MAX_CENTRES)."""
        flat = label.ravel()
        foreground = np.flatnonzero(flat)
        values = flat[foreground]
        centres = {}
        for cls in range(1, NUM_CLASSES):
            where = foreground[values == cls]
            if len(where):
                centres[cls] = where[:: max(1, math.ceil(len(where) / self.MAX_CENTRES))]
        return centres

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.steps

    def _epoch_items(self, epoch: int) -> np.ndarray:
        """Item indices for this rank's batches: this rank's share of seeded permutations of all items."""
        needed = self.steps * self.batch_size * self.world_size
        repeats = math.ceil(needed / self.num_items)
        order = np.concatenate([_rng(self.seed, epoch, r).permutation(self.num_items) for r in range(repeats)])
        return order[:needed][self.rank::self.world_size]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (image float32 (B, 1, *S), label int64 (B, *S)) on the device; `start_batch` skips ahead."""
        items = self._epoch_items(epoch).reshape(self.steps, self.batch_size)
        starts = self._patch_starts(epoch, items) if self.spatial_dims == 3 else None
        for step in range(start_batch, self.steps):
            if self.spatial_dims == 2:
                index = torch.from_numpy(items[step]).to(self.device)
                image = self.images.index_select(0, index).unsqueeze(1).float()
                label = self.labels.index_select(0, index).long()
            else:
                image, label = self._cut_patches(items[step], starts[step])
            if self.augment is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(int(_rng(self.seed, epoch, self.rank, step).integers(2**62)))
                image, label = augment_batch(image, label, generator, self.augment)
            yield image, label

    def _patch_starts(self, epoch: int, items: np.ndarray) -> np.ndarray:
        """(steps, B, 3) patch corners; ceil(fraction * n) of them, at random positions, centred on foreground."""
        rng = _rng(self.seed, epoch, self.rank, 2**31)
        n = items.size
        foreground = rng.permutation(n) < math.ceil(self.foreground_fraction * n)
        starts = np.zeros((n, 3), dtype=np.int64)
        for k, (item, wants_fg) in enumerate(zip(items.ravel(), foreground)):
            shape = np.array(self.volumes[item].shape)
            high = shape - np.array(self.patch_size)
            classes = sorted(self.centres[item])
            if wants_fg and classes:
                voxels = self.centres[item][classes[rng.integers(len(classes))]]
                centre = np.array(np.unravel_index(voxels[rng.integers(len(voxels))], shape))
                starts[k] = np.clip(centre - np.array(self.patch_size) // 2, 0, high)
            else:
                starts[k] = [rng.integers(h + 1) for h in high]
        return starts.reshape(*items.shape, 3)

    def _cut_patches(self, items: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for item, (x, y, z) in zip(items, starts):
            px, py, pz = self.patch_size
            images.append(self.volumes[item][x:x + px, y:y + py, z:z + pz])
            labels.append(self.volume_labels[item][x:x + px, y:y + py, z:z + pz])
        return torch.stack(images).unsqueeze(1).float(), torch.stack(labels).long()


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of a CaseSet for a DataLoader: item i -> (image float32 (1, H, W), label int64 (H, W))."""

    def __init__(self, cases: CaseSet):
        if cases.spatial_dims != 2:
            raise ValueError("SliceDataset serves 2D slices; for 3D use DeviceBatchSource (patches)")
        # Plain ndarray views of the memory maps: indexing a np.memmap costs more per item.
        self.images = [np.asarray(image) for image in cases.images]
        self.labels = [np.asarray(label) if label is not None else None for label in cases.labels]
        self.index = [(c, s) for c, image in enumerate(self.images) if self.labels[c] is not None
                      for s in range(image.shape[0])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        case, s = self.index[i]
        image = torch.from_numpy(self.images[case][s]).float().unsqueeze(0)  # torch converts float16 ~6x faster
        return image, torch.from_numpy(self.labels[case][s]).long()



def measure_read_speed(data_dir: str | Path, split: str = "train", cache_dir: str | Path | None = None,
                       max_files: int | None = None, workers: int | None = None) -> dict:
    """Seconds to read one epoch of `split` through the warm cache and file by file with nibabel (image and
    label, `get_fdata`: the student-project way), in one run, with the ratios. Cache figures: `open` is
    `load_split` on a warm cache (once per run); `epoch` copies every scan out of the memory map as
    DeviceBatchSource does; `slice_dataset` indexes every item of a SliceDataset (2D). Items are slices (2D)
    or volumes (3D); `max_files` limits the nibabel pass (rates stay comparable)."""
    load_split(data_dir, split, cache_dir=cache_dir, workers=workers)  # build the cache if it is cold
    times = {}
    started = time.perf_counter()
    cases = load_split(data_dir, split, cache_dir=cache_dir, workers=workers)
    times["open"] = time.perf_counter() - started
    started = time.perf_counter()
    for image, label in zip(cases.images, cases.labels):
        np.array(image), np.array(label)
    times["epoch"] = time.perf_counter() - started
    if cases.spatial_dims == 2:
        slices = SliceDataset(cases)
        started = time.perf_counter()
        for index in range(len(slices)):
            slices[index]
        times["slice_dataset"] = time.perf_counter() - started
    pairs = [p for case in cases.sources for p in case][:max_files]
    started = time.perf_counter()
    for pair in pairs:
        nib.load(str(pair.image)).get_fdata(), nib.load(str(pair.label)).get_fdata()
    nibabel_per_item = (time.perf_counter() - started) / len(pairs)
    items = sum(len(case) for case in cases.sources)
    result = {"items": items, "nibabel_seconds": nibabel_per_item * items}
    result.update({f"{name}_seconds": seconds for name, seconds in times.items()})
    for name in ("epoch", "slice_dataset"):
        if name in times:
            result[f"speedup_{name}"] = result["nibabel_seconds"] / times[name]
    result["speedup_open_and_epoch"] = result["nibabel_seconds"] / (times["open"] + times["epoch"])
    return result

