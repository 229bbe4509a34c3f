"""HipMRI layouts and file namings, and pairing files by name: the one home that the loader (dataset.py), the
check (datacheck.py) and exporters use. A new naming is one entry in NAMINGS; a new release of the data is one
entry in LAYOUTS.

A *naming* is one kind of image/label pair: the image folder, the label folder, the two file-name patterns, how
a pair's key is written, and its spatial dims. A *layout* is the set of namings that make up one release under
a root folder, and the sub-folders of --data-dir where that root may sit:

    2d          keras_slices_{train,validate,test}/case_004_week_0_slice_7.nii.gz
                keras_slices_seg_{train,validate,test}/seg_004_week_0_slice_7.nii.gz
                in ROOT, or in ROOT/keras_slices_data (the cluster copy, beside the 3D folders)
    3d-anon     semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz
                semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz
    3d-cluster  semantic_MRs/K019_Week1_LFOV.nii.gz
                semantic_labels_only/K019_Week1_SEMANTIC.nii.gz
                (any one letter before the patient number: B006, K019, S035; the number is the patient)

`resolve_layout` picks the layout to read (by dims when several are there) and `find_pairs` pairs its files by
the letter/patient/week/slice parsed from their names, never by sorted position. No NIfTI file in a layout folder
is left out silently: one that does not pair is a DataError naming it. Names are matched case-insensitively;
`.nii` and `.nii.gz` both count as NIfTI; names that start with "." (macOS `._x.nii.gz` resource forks,
`.DS_Store`, `.ipynb_checkpoints/`) and files of other types (README.txt) are not data. Nothing here reads an
image: dataset.py does.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = ["LAYOUTS", "NAMINGS", "SPLITS", "DataError", "FoundLayout", "Layout", "Naming", "Pair", "ParsedName",
           "check_split_folders_disjoint", "detect_layout", "find_layouts", "find_pairs", "is_hidden", "is_nifti",
           "listing", "nifti_stem", "patient_id", "patients_in_several_splits", "resolve_layout", "scan_naming"]

SPLITS = ("train", "validate", "test")
LISTED = 5  # offending files named in an error message before "... and N more"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_NIFTI_RE = r"\.nii(?:\.gz)?"


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (`.DS_Store`, `._case_004...nii.gz`, `.ipynb_checkpoints`) are never data."""
    return name.startswith(".")


def is_nifti(name: str) -> bool:
    """Whether a file name ends in .nii or .nii.gz (any case) and is not hidden."""
    return not is_hidden(name) and name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(name: str) -> str:
    """"case_004_week_0_slice_7" from "case_004_week_0_slice_7.nii.gz" (any case of the suffix)."""
    lower = name.lower()
    return next((name[: -len(s)] for s in NIFTI_SUFFIXES if lower.endswith(s)), name)


class ParsedName(NamedTuple):
    """What a file name says: letter prefix ("" when the naming has none), patient number as written, week,
    slice (2D) or None."""

    prefix: str
    patient: str
    week: int
    slice_index: int | None

    @property
    def pairing_key(self) -> tuple[str, int, int, int]:
        """The numbers an image and its label share (letters compared case-insensitively, numbers as integers)."""
        return self.prefix.upper(), int(self.patient), self.week, -1 if self.slice_index is None else self.slice_index


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Naming:
    """One kind of image/label pair: where each lives, how its name reads, how its key is written.

    The patterns are regular expressions over the whole file name without the .nii/.nii.gz suffix, with the
    named groups `patient`, `week`, and optionally `prefix` (a letter) and `slice`.
    """

    name: str  # "2d-train", "anon", "cluster"
    spatial_dims: int
    image_dir: str  # folder names, relative to the layout's root
    label_dir: str
    image_pattern: str
    label_pattern: str
    key_format: str  # str.format with prefix, patient, week, slice: Pair.key, e.g. "K019_Week1"
    image_example: str  # the naming as a user reads it, for error messages
    label_example: str
    split: str | None = None  # 2D: the split these folders hold

    def parse(self, filename: str, label: bool = False) -> ParsedName | None:
        """The parts of an image (or label) file name, or None when it does not follow this naming."""
        pattern = self.label_pattern if label else self.image_pattern
        match = re.fullmatch(pattern + _NIFTI_RE, filename, flags=re.IGNORECASE)
        if match is None:
            return None
        parts = match.groupdict()
        slice_index = parts.get("slice")
        return ParsedName(parts.get("prefix") or "", parts["patient"], int(parts["week"]),
                          None if slice_index is None else int(slice_index))

    def key(self, parsed: ParsedName) -> str:
        """Pair.key of a parsed image name: "case_004_week_0_slice_7", "Case_004_Week0", "K019_Week1"."""
        return self.key_format.format(prefix=parsed.prefix, patient=parsed.patient, week=parsed.week,
                                      slice=parsed.slice_index)


def _keras_slices(split: str) -> Naming:
    return Naming(f"2d-{split}", 2, f"keras_slices_{split}", f"keras_slices_seg_{split}",
                  r"case_(?P<patient>\d+)_week_(?P<week>\d+)_slice_(?P<slice>\d+)",
                  r"seg_(?P<patient>\d+)_week_(?P<week>\d+)_slice_(?P<slice>\d+)",
                  "case_{patient}_week_{week}_slice_{slice}",
                  "case_<patient>_week_<n>_slice_<k>.nii.gz", "seg_<patient>_week_<n>_slice_<k>.nii.gz", split)


NAMINGS: dict[str, Naming] = {naming.name: naming for naming in (
    *(_keras_slices(split) for split in SPLITS),
    Naming("anon", 3, "semantic_MRs_anon", "semantic_labels_anon",
           r"Case_(?P<patient>\d+)_Week(?P<week>\d+)_LFOV", r"Case_(?P<patient>\d+)_Week(?P<week>\d+)_SEMANTIC_LFOV",
           "Case_{patient}_Week{week}",
           "Case_<patient>_Week<n>_LFOV.nii.gz", "Case_<patient>_Week<n>_SEMANTIC_LFOV.nii.gz"),
    # The cluster copy writes one of several letters before the number (B006, K019, S035); the number is the
    # patient, and the key keeps the letter so that masks written for a scan keep its name.
    Naming("cluster", 3, "semantic_MRs", "semantic_labels_only",
           r"(?P<prefix>[A-Z])(?P<patient>\d+)_Week(?P<week>\d+)_LFOV",
           r"(?P<prefix>[A-Z])(?P<patient>\d+)_Week(?P<week>\d+)_SEMANTIC",
           "{prefix}{patient}_Week{week}",
           "<letter><patient>_Week<n>_LFOV.nii.gz", "<letter><patient>_Week<n>_SEMANTIC.nii.gz"),
)}


@dataclass(frozen=True)
class Layout:
    """One release of the data: its namings, and where under --data-dir its folders may sit."""

    name: str  # "2d", "3d-anon", "3d-cluster"
    namings: tuple[Naming, ...]  # 2D: one per split, in SPLITS order; 3D: one
    places: tuple[str, ...] = ("",)  # sub-folders of --data-dir that may hold the folders ("" is --data-dir)

    @property
    def spatial_dims(self) -> int:
        return self.namings[0].spatial_dims

    def naming(self, split: str | None) -> Naming | None:
        """2D: the naming of `split`'s folders; 3D: its one naming (split None). None when there is no such one."""
        if self.spatial_dims == 3:
            return self.namings[0] if split is None else None
        return next((n for n in self.namings if n.split == split), None)

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(folder for n in self.namings for folder in (n.image_dir, n.label_dir))


LAYOUTS: tuple[Layout, ...] = (
    Layout("2d", tuple(NAMINGS[f"2d-{split}"] for split in SPLITS), places=("", "keras_slices_data")),
    Layout("3d-anon", (NAMINGS["anon"],)),
    Layout("3d-cluster", (NAMINGS["cluster"],)),
)


@dataclass(frozen=True)
class FoundLayout:
    """A layout found on disk: `root` is the folder that holds its image/label folders."""

    layout: Layout
    root: Path
    present: tuple[str, ...]  # which of layout.folders exist under root

    @property
    def spatial_dims(self) -> int:
        return self.layout.spatial_dims

    def describe(self) -> str:
        """ "2d in /data/keras_slices_data (keras_slices_train/, keras_slices_seg_train/, ...)" for messages."""
        return f"{self.layout.name} in {self.root} ({', '.join(f + '/' for f in self.present)})"


def find_layouts(data_dir: str | Path) -> list[FoundLayout]:
    """Every layout with at least one of its image or label folders under `data_dir` (or under one of the
    layout's places below it), in LAYOUTS order. Reads folder names only."""
    data_dir = Path(data_dir)
    found = []
    for layout in LAYOUTS:
        for place in layout.places:
            root = data_dir / place if place else data_dir
            present = tuple(folder for folder in layout.folders if (root / folder).is_dir())
            if present:
                found.append(FoundLayout(layout, root, present))
    return found


# ---------------------------------------------------------------- find and pair


class DataError(Exception):
    """Bad or missing input data; the message names the file(s) and the problem."""


@dataclass(frozen=True)
class Pair:
    """One image file and its label file (None for unlabelled input)."""

    key: str  # Naming.key: "case_004_week_0_slice_7" (2D), "Case_004_Week0" / "K019_Week1" (3D); unique
    case_id: str  # the patient: its number as 3 digits, "004" for case_004, Case_4 and K004 alike (patient_id)
    week: int
    slice_index: int | None  # 2D only
    image: Path
    label: Path | None

    @property
    def case_key(self) -> str:
        """The scan this file belongs to: "case_004_week_0" (2D) or the 3D key."""
        return self.key if self.slice_index is None else self.key.rsplit("_slice_", 1)[0]


def patient_id(number: str) -> str:
    """The one spelling of a patient: "004" for "004", "4" and "0004". Names are compared by number, so the
    patient split, the checks and the weekly reports must not see Case_4 and Case_004 as two patients."""
    return f"{int(number):03d}"


def listing(paths: Sequence[str | Path], limit: int = LISTED) -> str:
    """'a, b, c' or 'a, b, c, ... and 7 more' for error messages."""
    names = [str(p) for p in paths]
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_layout(data_dir: str | Path, spatial_dims: int | None = None) -> FoundLayout:
    """The one layout under `data_dir` to read: of `spatial_dims` (2 or 3) when given, else the only one there.

    DataError, listing every layout found and its folders, when none fits or several do (several of different
    dims: pass --dims; several of the same dims, e.g. two 3D namings: point --data-dir at one of them).
    """
    data_dir = Path(data_dir)
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, not {spatial_dims!r}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder (pass the HipMRI root with --data-dir)")
    found = find_layouts(data_dir)
    chosen = [f for f in found if spatial_dims is None or f.spatial_dims == spatial_dims]
    if len(chosen) == 1:
        return chosen[0]
    where = "; ".join(f.describe() for f in found)
    if not found:
        wanted = [str(Path(place, layout.namings[0].image_dir)) + "/" for layout in LAYOUTS for place in layout.places]
        raise DataError(f"{data_dir}: no HipMRI layout found (looked for {', '.join(wanted)}); "
                        f"pass the folder that holds them")
    if not chosen:
        raise DataError(f"{data_dir}: no {spatial_dims}D layout found, only {where}; pass "
                        f"--dims {5 - spatial_dims} or another --data-dir")
    if spatial_dims is None and len({f.spatial_dims for f in chosen}) > 1:
        raise DataError(f"{data_dir}: holds several layouts: {where}; pass --dims 2 or --dims 3 to choose one")
    raise DataError(f"{data_dir}: holds several {chosen[0].spatial_dims}D layouts: {where}; point --data-dir at "
                    f"a folder with only one of them")


def detect_layout(data_dir: str | Path, spatial_dims: int | None = None) -> str:
    """"2d" or "3d": the dims of `resolve_layout(data_dir, spatial_dims)` (DataError as it raises)."""
    return f"{resolve_layout(data_dir, spatial_dims).spatial_dims}d"


def _expected(naming: Naming, label: bool, name: str) -> str:
    """What an unrecognised file in `naming`'s image (or label) folder should be called, and where a name it
    does follow belongs: an image name in the label folder, a 3D name among 2D slices, ..."""
    wanted = f"expected {naming.label_example if label else naming.image_example}"
    if naming.parse(name, not label):
        other = "an image" if label else "a label"
        return f"{wanted}; this is {other} name, whose folder is {naming.image_dir if label else naming.label_dir}/"
    for other in NAMINGS.values():
        for other_label in (False, True):
            if other is not naming and other.parse(name, other_label):
                folder = other.label_dir if other_label else other.image_dir
                folder = folder.replace(other.split, "<split>") if other.split else folder
                return f"{wanted}; this name follows the {other.name.split('-')[0]} naming, whose folder is {folder}/"
    return wanted


def _index_folder(folder: Path, naming: Naming, label: bool, problems: dict[str, list[str]]
                  ) -> dict[tuple, tuple[ParsedName, Path]]:
    """Pairing key -> (parsed name, file) for the NIfTI files of one folder. Unrecognised NIfTI names, duplicate
    keys and NIfTI files in sub-folders go to `problems`; hidden and non-NIfTI files are not data."""
    found: dict[tuple, list[tuple[ParsedName, Path]]] = defaultdict(list)
    # scandir's entries know whether they are folders without a stat per file (12,000 files in the real 2D train)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = folder / entry.name
        if is_hidden(entry.name):
            continue
        if entry.is_dir():
            nested = sorted(p for p in path.rglob("*") if is_nifti(p.name) and not any(map(is_hidden, p.parts)))
            if nested:
                problems["NIfTI files in a sub-folder, not read"].append(
                    f"{path} holds {len(nested)} (e.g. {nested[0].name}); move them into {folder} or out of it")
            continue
        if not is_nifti(path.name):
            continue
        parsed = naming.parse(path.name, label)
        if parsed is None:
            problems["unrecognised file name"].append(f"{path} ({_expected(naming, label, path.name)})")
        else:
            found[parsed.pairing_key].append((parsed, path))
    for entries in found.values():
        if len(entries) > 1:
            problems["duplicate key"].append(" and ".join(str(path) for _, path in entries))
    return {key: entries[0] for key, entries in found.items()}


def _ambiguous_letters(images: dict[tuple, tuple[ParsedName, Path]]) -> list[str]:
    """Patient numbers written with more than one letter (K005 and S005): which patient is it? Names one file
    per letter."""
    by_number: dict[int, dict[str, Path]] = defaultdict(dict)
    for (letter, number, *_), (_, path) in sorted(images.items()):
        by_number[number].setdefault(letter, path)
    return [f"patient {number:03d} under letters {', '.join(files)}: " + " and ".join(map(str, files.values()))
            + " (the number is the patient; rename or remove one)"
            for number, files in sorted(by_number.items()) if len(files) > 1]


def scan_naming(found: FoundLayout, naming: Naming, require_labels: bool = True
                ) -> tuple[list[Pair], dict[str, list[str]]]:
    """All pairs of one naming's folders under `found.root`, sorted by (patient, week, slice), and what is wrong
    with them as {kind: [items naming the files]} (empty when nothing is). Never raises on bad names."""
    problems: dict[str, list[str]] = defaultdict(list)
    image_dir, label_dir = found.root / naming.image_dir, found.root / naming.label_dir
    images: dict[tuple, tuple[ParsedName, Path]] = {}
    labels: dict[tuple, tuple[ParsedName, Path]] = {}
    for folder, is_label, index in ((image_dir, False, images), (label_dir, True, labels)):
        if folder.is_dir():
            index.update(_index_folder(folder, naming, is_label, problems))
        elif not is_label or require_labels:
            problems["missing folder"].append(f"{folder} (found {found.describe()})")
    problems["ambiguous patient number"] += _ambiguous_letters(images)
    if require_labels:
        problems["image without label"] += [str(images[k][1]) for k in sorted(images.keys() - labels.keys())]
    problems["label without image"] += [str(labels[k][1]) for k in sorted(labels.keys() - images.keys())]
    pairs = []
    for key in sorted(images, key=lambda k: (k[1:], k[0])):
        parsed, path = images[key]
        pairs.append(Pair(naming.key(parsed), patient_id(parsed.patient), parsed.week, parsed.slice_index, path,
                          labels[key][1] if key in labels else None))
    if not pairs and image_dir.is_dir():
        problems["empty split"].append(f"{image_dir} (no file named {naming.image_example})")
    return pairs, {k: v for k, v in problems.items() if v}


def _raise_problems(problems: dict[str, list[str]]) -> None:
    lines = [f"{kind} ({len(items)}): {listing(items)}" for kind, items in problems.items()]
    raise DataError("; ".join(lines) + ". Rename, move or remove these files (`python dataset.py check DIR` "
                    "lists every problem)")


def patients_in_several_splits(patients: dict[str, set[str]]) -> dict[str, list[str]]:
    """{patient: [splits]} for each patient found in more than one split ({split: patients} in), sorted."""
    shared = {p: [name for name, members in patients.items() if p in members] for p in set().union(*patients.values())}
    return {p: names for p, names in sorted(shared.items()) if len(names) > 1}


def check_split_folders_disjoint(found: FoundLayout) -> None:
    """2D: DataError if a patient's scans sit in more than one split folder (their scans would be trained on and
    tested on). Reads file names only; train.py and predict.py call it, as `check` reports it."""
    patients = {}
    for split in SPLITS:  # image names only, parsed: ~5 ms for the 2D phantom's 1,440 files
        naming = found.layout.naming(split)
        if naming is not None and (found.root / naming.image_dir).is_dir():
            parsed = (naming.parse(entry.name) for entry in os.scandir(found.root / naming.image_dir))
            patients[split] = {patient_id(name.patient) for name in parsed if name is not None}
    shared = patients_in_several_splits(patients) if patients else {}
    if shared:
        raise DataError("; ".join(f"patient {p} is in several split folders ({', '.join(names)})"
                                  for p, names in list(shared.items())[:LISTED])
                        + f" under {found.root}: a patient's scans would be both trained on and evaluated on. Move "
                          f"them into one split (`python dataset.py check DIR` lists them all)")


def find_pairs(data_dir: str | Path, split: str | None = None, require_labels: bool = True,
               spatial_dims: int | None = None) -> list[Pair]:
    """Image/label pairs of the layout `resolve_layout(data_dir, spatial_dims)`, sorted by (patient, week, slice).

    2D: `split` is "train", "validate" or "test" (the folders on disk). 3D: all pairs (`split` must be None;
    use `split_by_patient`). Every NIfTI file in the folders read must pair: an unrecognised name, an unpaired
    file, a duplicate key, a patient number under two letters, NIfTI files in a sub-folder, a missing folder or
    an empty split raise DataError naming the files (and the naming expected). Hidden and non-NIfTI files
    (README, .DS_Store, ._x.nii.gz) are ignored.
    """
    found = resolve_layout(data_dir, spatial_dims)
    naming = found.layout.naming(split)
    if naming is None and found.spatial_dims == 2:
        raise DataError(f"{found.root}: 2D layout; split must be one of {', '.join(SPLITS)}, not {split!r}")
    if naming is None:
        raise DataError(f"{found.root}: 3D layout has no split folders; call find_pairs(dir, None) and "
                        f"split_by_patient")
    pairs, problems = scan_naming(found, naming, require_labels)
    if problems:
        _raise_problems(problems)
    return pairs


