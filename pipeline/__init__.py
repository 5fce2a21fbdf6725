"""isnet-cxr jobs: the Predictor (one image -> class, mask, heatmap), batch runs, the inference
bundle's glue, cross-site studies, MLflow tracking and the command line.

``from pipeline import Predictor`` is the three-line Python API (see :mod:`pipeline.predictor`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str) -> Any:
    # lazy: `import pipeline` (bundle configs do it) must not load torch and MONAI up front
    if name in __all__:
        from pipeline import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
