"""recon_jax.data: real datasets read offline, their failure modes, and victim selection."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import recon_jax.data.lookup

from recon_jax.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    LOOKUP_ORDER,
    MNIST_CLASSES,
    ImageSet,
    describe_lookup,
    load_dataset,
    select,
)
from recon_jax.errors import ConfigError, DataError

# Published MNIST test-split class counts, digits 0..9.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def mnist_dir(shared_data: Path, require_path) -> Path:
    return require_path(shared_data / "mnist", "MNIST test split in IDX format")


@pytest.fixture(scope="session")
def cifar_npz(shared_data: Path, require_path) -> Path:
    return require_path(shared_data / "cifar10_test.npz", "CIFAR-10 test split as .npz")


@pytest.fixture(scope="session")
def fashion_dir(require_path) -> Path:
    return require_path(FASHION_DIR, "Debian package dataset-fashion-mnist")


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> ImageSet:
    return load_dataset(f"idx:{mnist_dir}")


@pytest.fixture(scope="session")
def cifar_test(cifar_npz: Path) -> ImageSet:
    return load_dataset(f"npz:{cifar_npz}")


@pytest.fixture(scope="session")
def digits() -> ImageSet:
    return load_dataset("digits")


@pytest.fixture
def isolated_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty $RECON_JAX_DATA, ~/.cache and system roots, and no $TFDS_DATA_DIR."""
    monkeypatch.setattr(recon_jax.data.lookup, "SYSTEM_DATA_ROOT", tmp_path / "system")
    monkeypatch.setenv("RECON_JAX_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    return tmp_path


def _as_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(images * 255).astype(np.uint8)


# --------------------------------------------------------------------------- real data


def test_digits_are_the_real_sklearn_digits(digits: ImageSet) -> None:
    assert len(digits) == 1797 and digits.shape == (8, 8, 1)
    assert digits.images.dtype == np.float32 and digits.labels.dtype == np.int64
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0
    assert digits.class_names == MNIST_CLASSES
    assert np.bincount(digits.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    json.dumps(digits.provenance)


def test_idx_reads_the_real_mnist_test_split(mnist_test: ImageSet, mnist_dir: Path) -> None:
    assert mnist_test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(mnist_test.labels).tolist() == MNIST_TEST_COUNTS
    assert mnist_test.images.min() == 0.0 and mnist_test.images.max() == 1.0
    assert mnist_test.class_names == MNIST_CLASSES
    assert mnist_test.provenance["split"] == "test"  # only the test split is shipped
    assert mnist_test.provenance["path"] == str(mnist_dir.resolve())
    with pytest.raises(DataError, match="no IDX train split"):
        load_dataset(f"idx:{mnist_dir}", split="train")
    with pytest.raises(ConfigError, match="'train' and 'test'"):
        load_dataset(f"idx:{mnist_dir}", split="validation")


def test_idx_reads_fashion_mnist_train_with_its_class_names(fashion_dir: Path) -> None:
    fashion = load_dataset(f"idx:{fashion_dir}")
    assert fashion.images.shape == (60000, 28, 28, 1)
    assert np.bincount(fashion.labels).tolist() == [6000] * 10
    assert fashion.class_names == FASHION_MNIST_CLASSES
    assert fashion.provenance["split"] == "train"


def test_fashion_mnist_by_name_falls_through_to_usr_share(
    isolated_roots: Path, fashion_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recon_jax.data.lookup, "SYSTEM_DATA_ROOT", fashion_dir.parent)  # the real /usr/share/datasets
    fashion = load_dataset("fashion_mnist", split="test")
    assert len(fashion) == 10000 and fashion.class_names == FASHION_MNIST_CLASSES
    assert fashion.provenance["path"] == str(fashion_dir.resolve())
    assert fashion.provenance["dataset"] == "fashion_mnist"


def test_names_resolve_under_recon_jax_data(
    shared_data: Path, mnist_dir: Path, cifar_npz: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECON_JAX_DATA", os.pathsep.join(["/nonexistent/first", str(shared_data)]))
    mnist = load_dataset("mnist")
    assert mnist.provenance["kind"] == "idx" and mnist.provenance["path"] == str(mnist_dir.resolve())
    assert np.bincount(mnist.labels).tolist() == MNIST_TEST_COUNTS
    cifar = load_dataset("cifar10", split="test")
    assert cifar.provenance["kind"] == "npz" and cifar.provenance["path"] == str(cifar_npz.resolve())
    assert cifar.provenance["split"] == "test" and cifar.class_names == CIFAR10_CLASSES


def test_name_not_found_lists_every_location_and_the_fix(isolated_roots: Path) -> None:
    (isolated_roots / "data").mkdir()
    only_test = isolated_roots / "data" / "cifar10_test.npz"
    np.savez(only_test, images=np.zeros((1, 32, 32, 3), np.uint8), labels=[0])
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", split="train")
    message = str(caught.value)
    assert "tried, in order" in message and "RECON_JAX_DATA" in message and "npz:PATH" in message
    assert f"{only_test} (holds test, not train)" in message
    assert str(isolated_roots / "home" / ".cache" / "recon_jax" / "data" / "cifar10") in message
    assert "download=False" in message


def test_describe_lookup_prints_the_order_and_what_exists(
    isolated_roots: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECON_JAX_DATA", str(mnist_dir.parent))
    (isolated_roots / "tfds" / "cifar10").mkdir(parents=True)
    text = describe_lookup(data_dir=str(isolated_roots / "tfds"))
    assert all(f"{step}. {line}" in text for step, line in enumerate(LOOKUP_ORDER, start=1))
    assert f"  mnist: {mnist_dir}" in text
    assert f"TFDS {isolated_roots / 'tfds' / 'cifar10'}" in text


def test_name_goes_to_a_tfds_data_dir_that_holds_it(isolated_roots: Path) -> None:
    """Step 2 of the lookup: the official builder is used, and it is not prepared there."""
    import tensorflow_datasets  # noqa: F401  (a dependency)
    (isolated_roots / "tfds" / "mnist").mkdir(parents=True)
    with pytest.raises(DataError, match="TFDS dataset 'mnist' is not prepared in .*tfds/mnist"):
        load_dataset("mnist", data_dir=str(isolated_roots / "tfds"))


def test_npz_reads_the_real_cifar10_test_split(cifar_test: ImageSet) -> None:
    assert cifar_test.images.shape == (10000, 32, 32, 3)
    assert cifar_test.class_names == CIFAR10_CLASSES
    assert np.bincount(cifar_test.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- CIFAR archives

N_TRAIN_BATCHES, PER_BATCH, N_TEST = 5, 16, 20  # 100 real images in all


@pytest.fixture(scope="session")
def cifar_sample(cifar_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """100 real CIFAR-10 images, uint8 NHWC, and their labels."""
    with np.load(cifar_npz) as archive:
        return archive["images"][:100], archive["labels"][:100].astype(np.int64)


def _cifar_batches(images: np.ndarray, labels: np.ndarray, version: str) -> dict[str, bytes]:
    """The published CIFAR-10 file layout, as {member name: bytes}."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    splits = {
        f"data_batch_{i + 1}": slice(i * PER_BATCH, (i + 1) * PER_BATCH) for i in range(N_TRAIN_BATCHES)
    }
    splits["test_batch"] = slice(N_TRAIN_BATCHES * PER_BATCH, None)
    files = {}
    for name, part in splits.items():
        if version == "binary":
            records = np.concatenate([labels[part, None].astype(np.uint8), chw[part]], axis=1)
            files[f"{name}.bin"] = records.tobytes()
        else:  # protocol 2, like the published (Python 2) pickles
            batch = {b"batch_label": name.encode(), b"labels": labels[part].tolist(), b"data": chw[part]}
            files[name] = pickle.dumps(batch, protocol=2)
    if version == "binary":
        files["batches.meta.txt"] = ("\n".join(CIFAR10_CLASSES) + "\n\n").encode()
    else:
        meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_vis": 3072}
        files["batches.meta"] = pickle.dumps(meta, protocol=2)
    return files


def _write_cifar_archive(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("version", ["binary", "python"])
@pytest.mark.parametrize("form", ["archive", "folder", "parent_of_archive", "parent_of_folder"])
def test_cifar_published_formats_load_bit_exactly(
    tmp_path: Path, cifar_sample: tuple[np.ndarray, np.ndarray], version: str, form: str
) -> None:
    images, labels = cifar_sample
    folder = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}[version]
    archive_name = {"binary": "cifar-10-binary.tar.gz", "python": "cifar-10-python.tar.gz"}[version]
    files = _cifar_batches(images, labels, version)
    if form in ("archive", "parent_of_archive"):
        archive = _write_cifar_archive(tmp_path / archive_name, folder, files)
        path = archive if form == "archive" else tmp_path
    else:  # as the archive extracts
        (tmp_path / folder).mkdir()
        for name, data in files.items():
            (tmp_path / folder / name).write_bytes(data)
        path = tmp_path / folder if form == "folder" else tmp_path

    train = load_dataset(f"cifar:{path}")
    test = load_dataset(f"cifar:{path}", split="test")

    n_train = N_TRAIN_BATCHES * PER_BATCH
    assert train.images.shape == (n_train, 32, 32, 3) and test.images.shape == (N_TEST, 32, 32, 3)
    np.testing.assert_array_equal(_as_uint8(train.images), images[:n_train])
    np.testing.assert_array_equal(_as_uint8(test.images), images[n_train:])
    np.testing.assert_array_equal(train.labels, labels[:n_train])
    np.testing.assert_array_equal(test.labels, labels[n_train:])
    assert train.class_names == CIFAR10_CLASSES
    assert train.provenance["format"] == version and train.provenance["split"] == "train"
    suffix = ".bin" if version == "binary" else ""
    assert train.provenance["files"] == [f"data_batch_{i}{suffix}" for i in range(1, 6)]


class _RunsShellCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_pickle_that_calls_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(_RunsShellCommand(f"touch {marker}"), protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load_dataset(f"cifar:{tmp_path}", split="test")
    assert not marker.exists()


def test_cifar_binary_truncated_record_is_refused(tmp_path: Path, cifar_sample) -> None:
    files = _cifar_batches(*cifar_sample, "binary")
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(files["test_batch.bin"][:-100])
    with pytest.raises(DataError, match="test_batch.bin is truncated"):
        load_dataset(f"cifar:{folder}", split="test")


def test_cifar_corrupt_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_dataset(f"cifar:{archive}")


# --------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="session")
def tfds_mnist(tmp_path_factory: pytest.TempPathFactory, mnist_test: ImageSet):
    """A tfds dataset (Tensor + ClassLabel features, array_record) prepared from real MNIST.

    The builder is not registered, so reading it back goes through tfds's builder-from-files
    path: prepared data, no builder code, as a user's data_dir would be.
    """
    import tensorflow_datasets as tfds
    images, labels = _as_uint8(mnist_test.images[:200]), mnist_test.labels[:200]
    splits = {"train": slice(0, 150), "test": slice(150, 200)}

    class ReconJaxTestMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(part) for name, part in splits.items()}

        def _generate_examples(self, part):
            for index in range(200)[part]:
                yield index, {"image": images[index], "label": int(labels[index])}

    data_dir = tmp_path_factory.mktemp("tfds")
    ReconJaxTestMnist(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir, images, labels, splits


def _pairs(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    """(image bytes, label) pairs in a canonical order: tfds shuffles records when preparing."""
    return sorted(zip(map(bytes, images), labels.tolist()))


def test_tfds_data_source_reads_back_exactly(tfds_mnist, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, images, labels, splits = tfds_mnist
    train = load_dataset("tfds:recon_jax_test_mnist", data_dir=str(data_dir))
    assert train.images.shape == (150, 28, 28, 1)
    expected = _pairs(images[splits["train"]], labels[splits["train"]])
    assert _pairs(_as_uint8(train.images), train.labels) == expected
    assert train.class_names == MNIST_CLASSES
    assert train.provenance["kind"] == "tfds" and train.provenance["split"] == "train"

    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    test = load_dataset("tfds:recon_jax_test_mnist:test")
    expected = _pairs(images[splits["test"]], labels[splits["test"]])
    assert _pairs(_as_uint8(test.images), test.labels) == expected
    assert test.provenance["data_dir"].startswith(str(data_dir))


def test_tfds_missing_dataset_or_split_is_a_data_error(tfds_mnist, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no dataset .recon_jax_test_mnist. and none is prepared in"):
        load_dataset("tfds:recon_jax_test_mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="TFDS knows no dataset 'recon_jax_no_such_set'"):
        load_dataset("tfds:recon_jax_no_such_set", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_dataset("tfds:recon_jax_test_mnist:validation", data_dir=str(tfds_mnist[0]))


def test_tfds_image_feature_without_a_decoder_asks_for_tensorflow(
    tmp_path: Path, mnist_test: ImageSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Image features need TensorFlow (or an image library) to decode: the error says so."""
    import tensorflow_datasets as tfds
    import PIL.Image as pil_image  # a test extra
    from tensorflow_datasets.core.features import image_feature

    def png(image: np.ndarray) -> bytes:  # encoded here so that preparing needs no TensorFlow
        buffer = io.BytesIO()
        pil_image.fromarray(image[..., 0]).save(buffer, format="PNG")
        return buffer.getvalue()

    images = _as_uint8(mnist_test.images[:8])

    class ReconJaxTestImageMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index, image in enumerate(images):
                yield index, {"image": png(image), "label": int(mnist_test.labels[index])}

    ReconJaxTestImageMnist(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    monkeypatch.setattr(image_feature, "PIL_Image", None)
    monkeypatch.setattr(image_feature, "cv2", None)
    needs_tf = r"TensorFlow is needed for that dataset: pip install 'recon_jax\[tfds\]'"
    with pytest.raises(DataError, match=needs_tf):
        load_dataset("tfds:recon_jax_test_image_mnist", data_dir=str(tmp_path))


def test_importing_recon_jax_data_imports_neither_tensorflow_nor_tfds() -> None:
    code = "import recon_jax.data, sys; assert not {'tensorflow', 'tensorflow_datasets'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --------------------------------------------------------------------------- bad input


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("name", ["imagenet", "bogus:path", "MNIST"])
def test_unknown_dataset_names_the_accepted_forms(name: str) -> None:
    expected = (
        f"unknown dataset '{name}'; expected one of digits, mnist, fashion_mnist, cifar10, "
        "idx:PATH, cifar:PATH, npz:PATH, tfds:NAME"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        load_dataset(name)


@pytest.mark.parametrize("kind", ["idx", "cifar", "npz"])
def test_missing_path_is_named(kind: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"path '{missing}' .* does not exist"):
        load_dataset(f"{kind}:{missing}")


def _write_idx_pair(folder: Path, images: bytes, labels: bytes, gz: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    suffix = ".gz" if gz else ""
    (folder / f"t10k-images-idx3-ubyte{suffix}").write_bytes(gzip.compress(images) if gz else images)
    (folder / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(gzip.compress(labels) if gz else labels)


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    labels = _idx_bytes(np.zeros(10, np.uint8))
    _write_idx_pair(tmp_path / "idx", _idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-500], labels, gz=True)
    truncated = r"t10k-images-idx3-ubyte.gz is truncated: header says \(10, 28, 28\)"
    with pytest.raises(DataError, match=truncated):
        load_dataset(f"idx:{tmp_path / 'idx'}")


def test_corrupt_gzip_is_a_data_error(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    images, labels = _idx_bytes(np.zeros((2, 4, 4), np.uint8)), _idx_bytes(np.zeros(2, np.uint8))
    _write_idx_pair(folder, images, labels, gz=True)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + np.random.default_rng(1).bytes(300))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is not a valid gzip file"):
        load_dataset(f"idx:{folder}")


def test_idx_wrong_magic_is_refused(tmp_path: Path) -> None:
    images = bytearray(_idx_bytes(np.zeros((2, 4, 4), np.uint8)))
    images[0] = 0x50
    _write_idx_pair(tmp_path / "idx", bytes(images), _idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match="is not an IDX file \\(bad magic"):
        load_dataset(f"idx:{tmp_path / 'idx'}")


def test_npz_missing_labels_names_the_keys_found(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8), np.uint8), targets=np.zeros(2))
    with pytest.raises(DataError, match=r"lacks labels; it has keys \['images', 'targets'\]"):
        load_dataset(f"npz:{tmp_path / 'x.npz'}")


def test_corrupt_npz_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(np.random.default_rng(2).bytes(1000))
    with pytest.raises(DataError, match="is not a readable .npz"):
        load_dataset(f"npz:{tmp_path / 'x.npz'}")


def test_npz_greyscale_gets_a_channel_and_nan_is_refused(tmp_path: Path) -> None:
    images = np.full((3, 5, 5), 0.5, np.float32)
    np.savez(tmp_path / "ok.npz", images=images, labels=[0, 1, 1])
    loaded = load_dataset(f"npz:{tmp_path / 'ok.npz'}")
    assert loaded.images.shape == (3, 5, 5, 1) and loaded.class_names == ("0", "1")
    images[1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", images=images, labels=[0, 1, 1])
    with pytest.raises(DataError, match=r"nan.npz: 1 pixel values are not finite"):
        load_dataset(f"npz:{tmp_path / 'nan.npz'}")


def _image_set(images: np.ndarray, labels: np.ndarray | None = None) -> ImageSet:
    labels = np.zeros(len(images), np.int64) if labels is None else labels
    return ImageSet(images, labels, ("a", "b"), {"kind": "test"})


@pytest.mark.parametrize("shape", [(2, 4, 4, 1, 1), (2, 4, 4, 2), (2, 4, 4)])
def test_image_set_requires_nhwc_with_1_or_3_channels(shape: tuple[int, ...]) -> None:
    with pytest.raises(DataError, match="4-D NHWC array"):
        _image_set(np.zeros(shape, np.float32))


def test_image_set_checks_labels_and_pixels() -> None:
    good = np.full((3, 4, 4, 3), 0.25, np.float32)
    with pytest.raises(DataError, match="labels length 2 does not match the 3 images"):
        _image_set(good, np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"labels must lie in 0..1"):
        _image_set(good, np.array([0, 1, 2]))
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="not finite"):
        _image_set(bad)
    with pytest.raises(DataError, match=r"must lie in \[0, 1\], found 0.25..255"):
        _image_set(np.concatenate([good, np.full((1, 4, 4, 3), 255.0, np.float32)]), np.zeros(4, np.int64))
    with pytest.raises(DataError, match="must be float32"):
        _image_set(good.astype(np.float64))


def test_selection_errors_name_the_problem_and_fix(digits: ImageSet) -> None:
    too_many = r"class 0 \('0'\) has 178 images but 200 were asked .*lower --n-per-class"
    with pytest.raises(DataError, match=too_many):
        select(digits, n_per_class=100)
    with pytest.raises(ConfigError, match="n_per_class must be a positive integer"):
        select(digits, n_per_class=0)
    with pytest.raises(ConfigError, match=r"unknown class ids \[10\]"):
        select(digits, n_per_class=5, classes=[1, 10])
    for positive in ([], [0, 1], [7], [1, 1]):
        with pytest.raises(ConfigError, match="proper non-empty subset|repeats class ids"):
            select(digits, n_per_class=5, classes=[0, 1], binary_positive=positive)
    with pytest.raises(ConfigError, match="mean must be one of pixel, channel, none"):
        select(digits, n_per_class=5, mean="image")


# --------------------------------------------------------------------------- selection


def test_multiclass_selection_is_balanced_disjoint_and_reindexed(digits: ImageSet) -> None:
    victim = select(digits, n_per_class=7, classes=[3, 8, 5], n_heldout=10, seed=4)
    assert victim.task == "multiclass" and victim.train.class_names == ("3", "8", "5")
    assert np.bincount(victim.train.labels).tolist() == [7, 7, 7]
    assert np.bincount(victim.heldout.labels).tolist() == [4, 3, 3]  # remainder to the first classes
    np.testing.assert_array_equal(np.array([3, 8, 5])[victim.train.labels], victim.original_train_labels)
    np.testing.assert_array_equal(digits.labels[victim.train_indices], victim.original_train_labels)
    np.testing.assert_array_equal(digits.images[victim.heldout_indices], victim.heldout.images)
    assert not set(victim.train_indices) & set(victim.heldout_indices)
    assert len(set(victim.train_indices)) == 21
    record = json.loads(json.dumps(victim.to_json()))
    assert record["provenance"]["selection"]["seed"] == 4
    assert record["train_indices"] == victim.train_indices.tolist()


def test_default_heldout_matches_train_balance(digits: ImageSet) -> None:
    victim = select(digits, n_per_class=20)
    assert np.bincount(victim.original_heldout_labels).tolist() == [20] * 10
    assert not set(victim.train_indices) & set(victim.heldout_indices)


def test_odd_even_grouping_spreads_over_digits(mnist_test: ImageSet) -> None:
    victim = select(mnist_test, n_per_class=50, binary_positive=[1, 3, 5, 7, 9], seed=1)
    assert victim.task == "binary"
    assert victim.train.class_names == ("0, 2, 4, 6, 8", "1, 3, 5, 7, 9")
    assert np.bincount(victim.train.labels).tolist() == [50, 50]
    assert np.bincount(victim.original_train_labels).tolist() == [10] * 10
    assert np.bincount(victim.original_heldout_labels).tolist() == [10] * 10
    np.testing.assert_array_equal(victim.train.labels, victim.original_train_labels % 2)
    assert not set(victim.train_indices) & set(victim.heldout_indices)


def test_cifar_vehicles_vs_animals_spreads_the_remainder(cifar_test: ImageSet) -> None:
    victim = select(cifar_test, n_per_class=250, binary_positive=[0, 1, 8, 9])
    assert victim.train.class_names[1] == "airplane, automobile, ship, truck"
    assert np.bincount(victim.original_train_labels).tolist() == [63, 63, 42, 42, 42, 42, 41, 41, 62, 62]
    assert np.bincount(victim.train.labels).tolist() == [250, 250]


def test_selection_is_reproducible_from_the_seed(digits: ImageSet) -> None:
    first, again, other = (select(digits, n_per_class=5, seed=seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first.train_indices, again.train_indices)
    np.testing.assert_array_equal(first.heldout_indices, again.heldout_indices)
    assert not np.array_equal(first.train_indices, other.train_indices)


def test_mean_modes_and_the_inverse_map(digits: ImageSet) -> None:
    victim = select(digits, n_per_class=10)
    assert victim.mean.shape == (1, 8, 8, 1) and victim.mean.dtype == np.float32
    np.testing.assert_allclose(victim.mean[0], victim.train.images.mean(axis=0), rtol=0, atol=1e-7)
    np.testing.assert_allclose(victim.train_centered().mean(axis=0), 0.0, atol=1e-6)
    # The inverse map is exact up to float32 rounding of (x - mean) + mean.
    np.testing.assert_allclose(victim.to_unit(victim.train_centered()), victim.train.images, atol=1e-7)
    np.testing.assert_allclose(victim.to_unit(victim.heldout_centered()), victim.heldout.images, atol=1e-7)

    channel = select(digits, n_per_class=10, mean="channel")
    assert channel.mean.shape == (1, 8, 8, 1)
    np.testing.assert_allclose(channel.mean, victim.train.images.mean(), rtol=1e-6)
    none = select(digits, n_per_class=10, mean="none")
    assert not none.mean.any()
    np.testing.assert_array_equal(none.train_centered(), none.train.images)
