"""The dataset names :func:`recon_jax.data.load_dataset` understands, their class names, and
how to supply data that is not found (the hint every "not found" error ends with)."""

from __future__ import annotations

MNIST_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

DATA_ENV = "RECON_JAX_DATA"
"""Environment variable: ``os.pathsep``-separated folders searched first for local files."""

DATASET_FORMS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "idx:PATH",
    "cifar:PATH",
    "npz:PATH",
    "tfds:NAME",
)

NAMED_CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": MNIST_CLASSES,
    "fashion_mnist": FASHION_MNIST_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}
"""The plain names that are looked up (:data:`recon_jax.data.LOOKUP_ORDER`), with their class names."""

HOW_TO_SUPPLY = (
    f"supply the data by setting {DATA_ENV} to a folder that holds it, by naming files "
    "directly as idx:PATH, cifar:PATH or npz:PATH, or by passing a prepared TFDS data_dir"
)
TFDS_EXTRA = "pip install 'recon_jax[tfds]' (TensorFlow)"
