"""Image files that are truncated or corrupt: input cases before they are segmented, and outputs that an
interrupted prediction left half-written.

SimpleITK (nnU-Net's NIfTI reader) reads a ``.nii.gz`` cut to half its bytes without an error and fills
the missing voxels with zeros; nnU-Net segments the rest and exits 0. Two depths of check:

- structural (``full=False``, cheap enough for the start-up of every ``nnUNetv2_predict``): the NIfTI header
  says how many bytes the image holds; an uncompressed ``.nii`` must be that long, and a ``.nii.gz``'s gzip
  trailer must record that length (a truncated file ends in arbitrary bytes). A mismatch is confirmed by the
  full check before it is reported (a file of several gzip members records only its last one's length).
- full (``full=True``, our predictors): every ``.gz`` decompressed to its end (gzip's own CRC and length
  checks catch corruption anywhere, not only truncation), and the NIfTI length compared with its header.

``.npz`` (nnU-Net's probabilities) is checked as a zip archive. Other formats are read by their own
readers, which fail on damage themselves (PNG, TIFF) or are not checked here (NRRD, MHA)."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Dict, Optional

from .nnunet_io import cases_in_folder

CHUNK = 1 << 20
NIFTI_ENDINGS = (".nii", ".nii.gz")


def _nifti_bytes(path: str) -> Optional[int]:
    """The bytes a NIfTI/Analyze file holds according to its header (data offset + voxels x item size), or
    None when the header itself cannot be read (reported by the caller)."""
    import nibabel
    import numpy as np
    image = nibabel.load(path)
    proxy = image.dataobj
    return int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize


def _gzip_length(path: str) -> int:
    """Decompressed length of a whole gzip file; raises EOFError (truncated) or gzip.BadGzipFile / zlib.error
    (corrupt: bad CRC, length or data)."""
    total = 0
    with gzip.open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return total
            total += len(chunk)


def _gzip_trailer_length(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _zip_damage(path: str) -> Optional[str]:
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"corrupt: {e}"
    return None if bad is None else f"corrupt: member {bad} fails its CRC check"


def damage(path: str, full: bool = True) -> Optional[str]:
    """What is wrong with one input file, or None if nothing was found."""
    name = path.lower()
    if name.endswith(".npz"):
        return _zip_damage(path)
    is_nifti = name.endswith(NIFTI_ENDINGS)
    if not is_nifti and not (full and name.endswith(".gz")):
        return None
    try:
        expected = _nifti_bytes(path) if is_nifti else None
    except Exception as e:
        return f"its NIfTI header cannot be read ({type(e).__name__}: {e})"
    size = os.path.getsize(path)
    if not name.endswith(".gz"):
        return None if size >= expected else f"truncated: {size:,} of the {expected:,} bytes its header declares"
    if not full:
        if size >= 18 and _gzip_trailer_length(path) == expected % (1 << 32):
            return None
    try:
        length = _gzip_length(path)
    except EOFError:
        return "truncated: its gzip stream ends before the end-of-stream marker"
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        return f"corrupt: {e}"
    if expected is not None and length < expected:
        return f"truncated: it decompresses to {length:,} of the {expected:,} bytes its header declares"
    return None


def damaged_files(folder: str, file_ending: Optional[str] = None, full: bool = True) -> Dict[str, str]:
    """file name -> what is wrong, for the image files of ``folder`` (those ending in ``file_ending``; all
    files when None)."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if (file_ending is None or name.endswith(file_ending)) and os.path.isfile(path):
            problem = damage(path, full=full)
            if problem:
                found[name] = problem
    return found


def damaged_cases(folder: str, file_ending: str) -> Dict[str, Dict[str, str]]:
    """case id -> {file name: what is wrong}, for the cases of ``folder`` with a damaged channel file."""
    found = {}
    for case, files in cases_in_folder(folder, file_ending).items():
        bad = {os.path.basename(p): problem for p in files if (problem := damage(p))}
        if bad:
            found[case] = bad
    return found


def damage_report(found: Dict[str, str], folder: str) -> str:
    listed = "; ".join(f"{name}: {problem}" for name, problem in list(found.items())[:10])
    more = f"; and {len(found) - 10} more" if len(found) > 10 else ""
    return f"{len(found)} input file(s) in {folder} are damaged ({listed}{more})."
