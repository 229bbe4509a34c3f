"""Batches from a decoded split: `DeviceBatchSource` keeps a CaseSet's labelled scans on the training device
(or, when they would not fit beside the model, in host memory) and samples (image, label) batches there (2D whole
slices; 3D patches with foreground oversampling, then `augment.augment_batch` on the device); `SliceDataset` serves
the same 2D slices to a torch DataLoader; `measure_read_speed` times reading a split through the cache against
reading the files with nibabel.
"""

from __future__ import annotations

import logging
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

__all__ = ["DeviceBatchSource", "SliceDataset", "choose_placement", "free_device_memory", "measure_read_speed",
           "working_memory_bytes"]

log = logging.getLogger("hipmri.sampling")

PLACEMENTS = ("auto", "device", "host")
# What autograd saves per input voxel of a training batch, for the default UNet widths (16..256) in fp32 (--no-amp,
# the largest case), measured with torch.autograd.graph.saved_tensors_hooks on the default steps: 2D 1380 B (batch
# norm), 3D 938 B; bf16 autocast saves 740 / 584 B.
SAVED_BYTES_PER_VOXEL = {2: 1400, 3: 950}
FIXED_WORKING_BYTES = 2**30  # CUDA libraries' handles and workspaces, weights and optimiser, validation's windows


def working_memory_bytes(spatial_dims: int, batch_size: int, item_shape: Sequence[int], width: int = 16) -> int:
    """Device memory a training step needs beside the data, estimated for a UNet whose first stage has `width`
    channels (activations grow in proportion): twice what autograd saves for a batch of `batch_size` items of
    `item_shape` (the second half: the gradients alive during backward, cuDNN's workspaces and the allocator's
    slack) plus FIXED_WORKING_BYTES. Default 3D (2 patches of 128x128x64): 5.1 GB; default 2D (8 slices of
    256x128): 1.8 GB."""
    voxels = batch_size * math.prod(int(s) for s in item_shape)
    return int(2 * SAVED_BYTES_PER_VOXEL[spatial_dims] * voxels * width / 16) + FIXED_WORKING_BYTES


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now, as the driver counts them (other processes' use included), or None where the
    device has no memory of its own to run out of (CPU) or torch cannot say (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def choose_placement(placement: str, needed: int, free: int | None, reserve: int) -> tuple[str, str]:
    """("device" | "host", why) for a split of `needed` bytes: "auto" keeps it on the device when it fits beside
    `reserve` bytes of working memory in `free` (None: no limit known), else in host memory."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    gb = f"{needed / 1e9:.2f} GB of scans"
    if placement != "auto":
        return placement, f"{gb}, placement={placement} asked for"
    if free is None:
        return "device", f"{gb}, no device memory limit to check"
    verdict = "fit" if needed + reserve <= free else "do not fit"
    return ("device" if verdict == "fit" else "host"), (
        f"{gb} + {reserve / 1e9:.2f} GB reserved for the model's working memory {verdict} in "
        f"{free / 1e9:.2f} GB free")


def _rng(*numbers: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(n) for n in numbers]))


class DeviceBatchSource:
    """A split's labelled scans as tensors on `device`, sampled into (image, label) batches there.

    Placement: "device" keeps the scans on `device` and cuts batches there; "host" keeps them in host memory, cuts
    each batch there into pinned memory (on CUDA) and copies it to `device` without blocking; "auto" (default)
    chooses "device" when the split fits in the device's free memory beside `reserve_bytes` (default
    `working_memory_bytes` for this batch and a UNet whose first stage has `model_width` channels) and logs the
    choice. Both give the same batches.

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
                 steps_per_epoch: int | None = None, placement: str = "auto", reserve_bytes: int | None = None,
                 model_width: int = 16):
        labelled = [i for i, label in enumerate(cases.labels) if label is not None]
        if not labelled:
            raise DataError("DeviceBatchSource: the split has no labelled scans to train on")
        self.cases, self.spatial_dims, self.device = cases, cases.spatial_dims, torch.device(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.augment, self.foreground_fraction, self.model_width = augment, foreground_fraction, model_width
        if self.spatial_dims == 2:
            if patch_size is not None:
                raise ValueError("DeviceBatchSource: 2D trains on whole slices; pass patch_size=None")
            self._place(placement, reserve_bytes, [cases.images[i].shape for i in labelled], labelled)
            self.images = torch.from_numpy(np.concatenate([cases.images[i] for i in labelled])).to(self.store)
            self.labels = torch.from_numpy(np.concatenate([cases.labels[i] for i in labelled])).to(self.store)
            self.num_items = len(self.images)
            default_steps = self.num_items // world_size // batch_size
        else:
            if patch_size is None or len(patch_size) != 3:
                raise ValueError(f"DeviceBatchSource: 3D needs a patch_size of 3 ints, not {patch_size}")
            self.patch_size = tuple(int(p) for p in patch_size)
            padded = [tuple(max(p, s) for p, s in zip(self.patch_size, cases.images[i].shape)) for i in labelled]
            self._place(placement, reserve_bytes, padded, labelled)
            self._volumes_to_store(cases, labelled)
            self.num_items = len(self.volumes)
            default_steps = 250
        if self.num_items < world_size:
            raise DataError(f"{self.num_items} training items cannot be shared by {world_size} ranks")
        self.steps = steps_per_epoch or max(1, default_steps)
        if self.spatial_dims == 2:  # a split smaller than one batch per rank still gives one (smaller) batch
            self.batch_size = min(batch_size, self.num_items // world_size)

    def _place(self, placement: str, reserve_bytes: int | None, shapes: list[tuple[int, ...]],
               labelled: list[int]) -> None:
        """Set self.placement ("device" | "host") and self.store (where the scans live); log the choice and why."""
        voxel_bytes = self.cases.images[labelled[0]].itemsize + self.cases.labels[labelled[0]].itemsize
        needed = sum(math.prod(shape) for shape in shapes) * voxel_bytes
        if reserve_bytes is None:
            item_shape = shapes[0][1:] if self.spatial_dims == 2 else self.patch_size
            reserve_bytes = working_memory_bytes(self.spatial_dims, self.batch_size, item_shape, self.model_width)
        free = free_device_memory(self.device) if placement == "auto" else None
        self.placement, why = choose_placement(placement, needed, free, reserve_bytes)
        self.store = self.device if self.placement == "device" else torch.device("cpu")
        if self.placement == "device":
            log.info("training split on %s: %s", self.device, why)
        else:
            log.info("training split in host memory, each batch copied to %s: %s", self.device, why)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device without blocking the host: on CUDA through pinned memory (a copy
        from pageable memory, or any copy without non_blocking, waits for the queued kernels)."""
        if self.device.type == "cuda" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _host_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An empty host tensor to gather a batch into: pinned on CUDA, so its copy can run asynchronously (torch's
        pinned-memory cache reuses it only after that copy has finished)."""
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.device.type == "cuda")

    def _volumes_to_store(self, cases: CaseSet, labelled: list[int]) -> None:
        self.volumes, self.volume_labels, self.centres = [], [], []
        for i in labelled:
            image, label = np.array(cases.images[i]), np.array(cases.labels[i])  # copies: off the read-only mmap
            pad = [(0, max(0, p - s)) for p, s in zip(self.patch_size, image.shape)]
            if any(after for _, after in pad):
                image = np.pad(image, pad, constant_values=image.min())
                label = np.pad(label, pad, constant_values=0)
            self.volumes.append(torch.from_numpy(np.ascontiguousarray(image)).to(self.store))
            self.volume_labels.append(torch.from_numpy(np.ascontiguousarray(label)).to(self.store))
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
        if self.spatial_dims == 2:  # one copy of the epoch's indices to where the slices are, not one per batch
            indices = torch.from_numpy(np.ascontiguousarray(items))  # a strided copy could not be asynchronous
            indices = self._to_device(indices) if self.placement == "device" else indices
        for step in range(start_batch, self.steps):
            if self.spatial_dims == 2:
                image, label = self._gather_slices(indices[step])
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

    def _gather_slices(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float32 (B, 1, H, W), label int64 (B, H, W)) on the device; `index` lives with the scans."""
        if self.placement == "device":
            image, label = self.images.index_select(0, index), self.labels.index_select(0, index)
        else:
            image = torch.index_select(self.images, 0, index,
                                       out=self._host_buffer((len(index), *self.images.shape[1:]), self.images.dtype))
            label = torch.index_select(self.labels, 0, index,
                                       out=self._host_buffer((len(index), *self.labels.shape[1:]), self.labels.dtype))
            image, label = self._to_device(image), self._to_device(label)  # compact dtypes over the bus
        return image.unsqueeze(1).float(), label.long()

    def _cut_patches(self, items: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float32 (B, 1, *patch), label int64 (B, *patch)) on the device, cut where the scans are."""
        images, labels = [], []
        for item, (x, y, z) in zip(items, starts):
            px, py, pz = self.patch_size
            images.append(self.volumes[item][x:x + px, y:y + py, z:z + pz])
            labels.append(self.volume_labels[item][x:x + px, y:y + py, z:z + pz])
        if self.placement == "device":
            image, label = torch.stack(images), torch.stack(labels)
        else:
            shape = (len(images), *self.patch_size)
            image = self._to_device(torch.stack(images, out=self._host_buffer(shape, images[0].dtype)))
            label = self._to_device(torch.stack(labels, out=self._host_buffer(shape, labels[0].dtype)))
        return image.unsqueeze(1).float(), label.long()


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

