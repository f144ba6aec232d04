"""mmsd_ext: fused kernels and a training layer for weakly-supervised temporal action localization.

The ops (each with ``backend=None|"auto"|"reference"|"cpu"|"cuda"|"triton"``):

- ``topk_mil_pool``, ``mil_k``: top-k multiple-instance pooling over time.
- ``snippet_distill_loss``, ``mmsd_distill_loss``: snippet-level distillation.
- ``temporal_nms``, ``soft_temporal_nms``: 1-D non-maximum suppression.

``build_info()`` says what was compiled and which backends run here;
``use_backend(name)`` overrides the choice for a block of code.
"""

__version__ = "0.1.0"

from . import _loader  # noqa: F401  (loads the compiled ops, or says why not)
from ._backend import BACKENDS, available_backends, build_info, use_backend
from .distill import mmsd_distill_loss, snippet_distill_loss
from .mil import mil_k, topk_mil_pool
from .nms import soft_temporal_nms, temporal_nms
from . import evaluate, localize  # noqa: E402,F401  (need the ops above)
from .evaluate import (  # noqa: E402
    DetectionMAP,
    classification_map,
    detection_map,
    export_detections_json,
    mmsd_detection_map,
    thumos14_detection_map,
)
from .localize import mmsd_proposals  # noqa: E402

__all__ = [
    "BACKENDS",
    "available_backends",
    "build_info",
    "use_backend",
    "topk_mil_pool",
    "mil_k",
    "snippet_distill_loss",
    "mmsd_distill_loss",
    "temporal_nms",
    "soft_temporal_nms",
    "mmsd_proposals",
    "DetectionMAP",
    "detection_map",
    "thumos14_detection_map",
    "mmsd_detection_map",
    "classification_map",
    "export_detections_json",
]
