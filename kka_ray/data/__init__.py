"""Datasets and one-class protocols for KKA (arXiv 2502.14880): normal images ``D_n`` with
their descriptions, held-out normals for thresholds, and a labelled test set.

Loaders: Fashion-MNIST (idx), CIFAR-10/100 (python pickles), Oxford-102 + Reed captions,
UCM-Caption, and a user's image folder + captions JSONL. :func:`build_split` turns the
``data`` config section into a :class:`OneClassSplit`. Only numpy is imported eagerly;
PIL and scipy load when a loader needs them.
"""

from kka_ray.data.captions import template_captions
from kka_ray.data.cifar import load_cifar
from kka_ray.data.fashion_mnist import load_fashion_mnist
from kka_ray.data.folder import ImageCatalog, load_image_folder, read_image_folder
from kka_ray.data.imagesets import ImageSet
from kka_ray.data.protocols import OneClassSplit, build_split, make_one_class_split

__all__ = [
    "ImageCatalog",
    "ImageSet",
    "OneClassSplit",
    "build_split",
    "load_cifar",
    "load_fashion_mnist",
    "load_image_folder",
    "make_one_class_split",
    "read_image_folder",
    "template_captions",
]
