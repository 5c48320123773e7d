"""Real image datasets, read offline, and the victim's training / held-out selection.

Everything here is numpy: images come back as ``float32`` NHWC arrays in ``[0, 1]``.

Dataset names understood by :func:`load_dataset`:

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped in its wheel.
  Always available offline; the embedded default.
- ``idx:PATH``: a folder of MNIST-family IDX files (``train-images-idx3-ubyte[.gz]`` ...).
- ``cifar:PATH``: CIFAR-10 as published, binary or python version, archive or extracted
  folder (or a folder holding one of those).
- ``npz:PATH``: an ``.npz`` with ``images``, ``labels`` and optionally ``classes``.
- ``tfds:NAME`` or ``tfds:NAME:SPLIT``: a dataset already prepared in a TFDS ``data_dir``
  (array_record format), read with ``tfds.data_source``.
- ``mnist``, ``fashion_mnist``, ``cifar10``: looked up in this order (:data:`LOOKUP_ORDER`):

  1. local files, under each root folder in turn: every folder in ``$RECON_JAX_DATA``
     (``os.pathsep``-separated), then ``~/.cache/recon_jax/data``, then
     ``/usr/share/datasets``. In a root, ``ROOT/<name>`` or ``ROOT/<name with - for _>``
     as an IDX folder (mnist, fashion_mnist) or CIFAR archive/folder (cifar10), then
     ``ROOT/<name>.npz``, ``ROOT/<name>_test.npz``, ``ROOT/<name>_train.npz``. A file
     named for one split is used only when that split (or no split) is asked for, and
     ``ROOT/<name>.npz`` only when no split is asked for.
  2. a prepared TFDS ``data_dir`` (the ``data_dir`` argument, else ``$TFDS_DATA_DIR``)
     that has a ``<name>`` folder.
  3. a TFDS download and prepare, only with ``download=True`` (needs network and
     TensorFlow).

  :func:`describe_lookup` prints this order and what exists on the machine.
  For example, with ``RECON_JAX_DATA=/path/to/data`` and that folder holding an IDX folder
  ``mnist`` and a file ``cifar10_test.npz``, ``mnist`` is read from ``/path/to/data/mnist``
  and ``cifar10`` from ``/path/to/data/cifar10_test.npz`` (its test split); the Debian
  package ``dataset-fashion-mnist`` provides ``/usr/share/datasets/fashion-mnist``.

Nothing is cached between calls. ``tensorflow_datasets`` is imported only on the TFDS
paths, and TensorFlow only if tfds itself needs it there.

:func:`select` then draws the victim's balanced training set and a disjoint held-out pool
from the same classes, and subtracts the training mean: pixels scaled to ``[0, 1]``, then
the training-set mean subtracted, as in Haim et al. (2022) and Runkel et al. (2024); the
held-out pool is what lets a reconstruction count as evidence of membership.

The package, one idea per module:

- :mod:`~recon_jax.data.containers`: :class:`ImageSet` and :class:`VictimData`;
- :mod:`~recon_jax.data.catalog`: dataset names and class names;
- :mod:`~recon_jax.data.lookup`: :func:`load_dataset`, the roots and the lookup order;
- :mod:`~recon_jax.data.sources`: one reader per format (digits, idx, cifar, npz, tfds);
- :mod:`~recon_jax.data.selection`: :func:`select`, the balanced split and the centring.
"""

from __future__ import annotations

from recon_jax.data.catalog import (
    CIFAR10_CLASSES,
    DATA_ENV,
    DATASET_FORMS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
)
from recon_jax.data.containers import ImageSet, VictimData
from recon_jax.data.lookup import LOOKUP_ORDER, data_roots, describe_lookup, load_dataset
from recon_jax.data.selection import MEAN_MODES, MeanMode, select

__all__ = [
    "CIFAR10_CLASSES",
    "DATA_ENV",
    "DATASET_FORMS",
    "FASHION_MNIST_CLASSES",
    "LOOKUP_ORDER",
    "MEAN_MODES",
    "MNIST_CLASSES",
    "ImageSet",
    "VictimData",
    "data_roots",
    "describe_lookup",
    "load_dataset",
    "select",
]
