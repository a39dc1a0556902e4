"""Garment classifier: IDX files, the served preprocessing, the network, the report, the training CLI."""

import gzip
import hashlib

import numpy as np
import pytest
import torch

from fashionserve.catalogue import data
from fashionserve.catalogue.data import DataError, load_split, official_files, read_idx, write_idx
from fashionserve.catalogue.networks.classifier import CLASSES, ClassifierConfig, GarmentClassifier
from fashionserve.catalogue.samples import write_synthetic_set
from fashionserve.catalogue.stages import ClassifierServing, GarmentPreprocess
from fashionserve.catalogue.training import classification_report
from tests.conftest import run_cli


def preprocess(images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return GarmentPreprocess()(torch.from_numpy(images)).numpy()


def test_idx_round_trip_gzipped_or_not(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    raw = gzip.decompress((tmp_path / "images.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:16] == bytes([0, 0, 0, 5, 0, 0, 0, 28, 0, 0, 0, 28])
    (tmp_path / "plain").write_bytes(raw)
    assert np.array_equal(read_idx(tmp_path / "plain"), images)


def test_bad_idx_files_name_the_problem(tmp_path):
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(DataError, match="holds 10 bytes, its header \\[9\\] says 17"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "text")
    with pytest.raises(DataError, match="no train-images-idx3-ubyte.gz"):
        load_split(tmp_path, "train")


def test_official_files_by_distributed_md5_or_by_content(tmp_path, monkeypatch):
    # The drawn set stands in for the official files: its md5s replace the official ones.
    write_synthetic_set(tmp_path, train=20, test=10, seed=0)
    files = {stem: tmp_path / f"{stem}.gz" for stem in data.OFFICIAL_CONTENT_MD5}
    md5 = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in files.values()}
    contents = {stem: gzip.decompress(path.read_bytes()) for stem, path in files.items()}
    monkeypatch.setattr(data, "OFFICIAL_MD5", md5)
    monkeypatch.setattr(
        data, "OFFICIAL_CONTENT_MD5", {stem: hashlib.md5(raw).hexdigest() for stem, raw in contents.items()}
    )
    assert official_files(tmp_path)
    images = files["train-images-idx3-ubyte"]
    images.write_bytes(gzip.compress(contents["train-images-idx3-ubyte"], mtime=1))  # re-gzipped
    assert hashlib.md5(images.read_bytes()).hexdigest() != md5[images.name] and official_files(tmp_path)
    images.unlink()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(contents["train-images-idx3-ubyte"])  # unpacked
    assert official_files(tmp_path)
    changed = bytearray(contents["train-images-idx3-ubyte"])
    changed[-1] ^= 1
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes(changed))
    assert not official_files(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    assert not official_files(tmp_path)


def test_preprocess_copies_a_centred_fashion_mnist_image():
    rng = np.random.default_rng(0)
    garments = np.zeros((2, 28, 28), np.uint8)
    garments[0, :, 7:20] = rng.integers(20, 256, (28, 13))  # tall: touches top and bottom
    garments[1, 3:25, :] = rng.integers(20, 256, (22, 28))  # wide: touches left and right
    out = preprocess(np.repeat(garments[..., None], 3, axis=-1))
    assert out.shape == (2, 1, 28, 28)
    assert np.abs(out[:, 0] * 255 - garments).max() < 1e-3


def test_preprocess_trims_centres_and_inverts_a_product_photo():
    photo = np.full((300, 200, 3), 250, np.uint8)  # white background
    photo[30:270, 60:140] = 20  # a dark garment, 240 x 80 pixels
    (white,) = preprocess(photo[None])[:, 0]
    # longest side 240 -> 28 rows; width 80 * 28 / 240 = 9.33 columns from floor((28 - 9.33) / 2) = 9
    inside = (250 - 20) / 250  # background -> 0, darkest -> 1
    assert np.allclose(white[:, 9:18], inside, atol=1e-5)
    # a third of column 18 is garment: 3 of its 8 sub-sample columns land on it
    assert np.allclose(white[:, 18], inside * 3 / 8, atol=1e-5)
    assert np.allclose(white[:, :9], 0) and np.allclose(white[:, 19:], 0)
    dark = np.full_like(photo, 5)  # Fashion-MNIST polarity, same contrast: (235 - 5) / 250 = inside
    dark[30:270, 60:140] = 235
    (black,) = preprocess(dark[None])[:, 0]
    assert np.allclose(black, white, atol=1e-5)
    assert np.all(preprocess(np.full((1, 40, 30, 3), 128, np.uint8)) == 0)  # nothing stands out


def test_network_outputs_probabilities_and_label():
    model = GarmentClassifier(ClassifierConfig()).eval()
    assert sum(p.numel() for p in model.parameters()) < 600_000
    probabilities, label = ClassifierServing(model)(torch.rand(3, 1, 28, 28))
    assert probabilities.shape == (3, 10) and torch.allclose(probabilities.sum(1), torch.ones(3))
    assert label.shape == (3, 1) and label.dtype == torch.int64
    assert torch.equal(label[:, 0], probabilities.argmax(1))


def test_classification_report_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    report = classification_report(labels, predicted)
    t_shirt, trouser, pullover = (report["per_class"][CLASSES[k]] for k in range(3))
    assert t_shirt == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert trouser == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert pullover == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion"][1][1] == 2 and report["confusion"][2][0] == 1


def test_training_cli_refuses_missing_data_in_one_line(tmp_path):
    result = run_cli("train/garment_classifier.py", "--data", str(tmp_path), "--out", str(tmp_path / "c.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "no train-images-idx3-ubyte.gz" in result.stderr
