"""Key knowledge of the normal data (KKA, arXiv 2502.14880, Eq. 1-3).

- ``features``: pretrained-backbone features and their normalisation (``f`` and ``z`` of Eq. 1)
- ``mahalanobis``: Eq. 1, k-means + Mahalanobis normality score (also the SSD baseline)
- ``selection``: Eq. 2, the most typical images' descriptions per cluster
- ``prompts``: Eq. 3 prompt building from those descriptions
- ``backbones``: loading/converting the pretrained backbones

Names are exported lazily, so ``import kka_ray.knowledge`` does not import torch or sklearn.
"""

from __future__ import annotations

from kka_ray._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "features": "FeatureExtractor FeatureNormalizer FeatureBatchExtractor",
    "mahalanobis": "MahalanobisScorer",
    "selection": "Representative select_representatives",
    "prompts": "build_prompts resolve_template",
    "backbones": "load_backbone prepare_efficientnet_lite0",
})
