"""Files that ship with the package: the bundle's ``models/`` and ``configs/`` folders.

They are installed as the data packages ``isnet_cxr_models`` and ``isnet_cxr_configs`` (see
``pyproject.toml``), so the default segmenter and the study configs are found from any folder
after ``pip install``, and from the source checkout in an editable install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

_PACKAGES = {"models": "isnet_cxr_models", "configs": "isnet_cxr_configs"}
DEFAULT_SEGMENTER = "seg_unet_synthetic.pt"


def bundle_file(folder: Literal["models", "configs"], name: str) -> Path:
    """The path of ``<folder>/<name>`` as installed (or in the source checkout when the package
    is imported from there without being installed).

    Raises:
        FileNotFoundError: no such file ships with the package.
    """
    # the package's folders (a namespace package: an editable install lists a path hook beside
    # the real folder, which importlib.resources.files() refuses), then the source checkout
    spec = importlib.util.find_spec(_PACKAGES[folder])
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    roots.append(Path(__file__).resolve().parents[1] / folder)
    for root in roots:
        path = root / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{folder}/{name} is not part of this installation of isnet-cxr (looked in "
        f"{', '.join(str(r) for r in roots)}); reinstall the package or give the path explicitly"
    )


def default_segmenter() -> Path:
    """The committed lung U-Net checkpoint (trained on synthetic films only)."""
    return bundle_file("models", DEFAULT_SEGMENTER)
