"""Training and evaluation of the garment classifier.

Images go through the served preprocessing (`GarmentPreprocess`) once before training, so the network
learns on exactly what Triton will feed it (for Fashion-MNIST's own images it is an exact copy unless the
garment is off-centre). SGD with Nesterov momentum and weight decay, a cosine-decaying learning rate
stepped every batch, random horizontal flips.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fashionserve.catalogue.networks.classifier import CLASSES, ClassifierConfig, GarmentClassifier
from fashionserve.catalogue.stages import GarmentPreprocess
from fashionserve.checkpoints import CheckpointError, load_strict, read_state_dict

_PREPROCESS_CHUNK = 256  # images per preprocessing call: bounds the 224x224 sampling grids in memory


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 15
    batch_size: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


def preprocess(images: np.ndarray) -> Tensor:
    """uint8 [N, 28, 28] grayscale (or [N, H, W, 3]) -> float [N, 1, 28, 28], as the server does."""
    module = GarmentPreprocess()
    batches = []
    with torch.no_grad():
        for start in range(0, len(images), _PREPROCESS_CHUNK):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + _PREPROCESS_CHUNK]))
            if chunk.ndim == 3:
                chunk = chunk[..., None].expand(-1, -1, -1, 3)
            batches.append(module(chunk))
    return torch.cat(batches)


def classification_report(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Per-class precision/recall/F1 and support, their macro averages, accuracy, confusion matrix
    (rows: true class, columns: predicted)."""
    count = len(CLASSES)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted_total, actual_total = confusion.sum(0), confusion.sum(1)
    precision = np.divide(true_positive, predicted_total, out=np.zeros(count), where=predicted_total > 0)
    recall = np.divide(true_positive, actual_total, out=np.zeros(count), where=actual_total > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(count), where=denominator > 0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual_total[i]),
        }
        for i, name in enumerate(CLASSES)
    }
    return {
        "accuracy": float(true_positive.sum() / max(1, len(labels))),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def format_report(report: dict) -> str:
    """The report as a table, one class per line."""
    lines = [f"{'class':<12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, row in report["per_class"].items():
        lines.append(
            f"{name:<12} {row['precision']:>9.4f} {row['recall']:>9.4f} {row['f1']:>9.4f} {row['support']:>8}"
        )
    support = sum(row["support"] for row in report["per_class"].values())
    lines.append(
        f"{'macro avg':<12} {report['macro_precision']:>9.4f} {report['macro_recall']:>9.4f} "
        f"{report['macro_f1']:>9.4f} {support:>8}"
    )
    lines.append(f"accuracy {report['accuracy']:.4f}")
    return "\n".join(lines)


def predict(model: GarmentClassifier, garments: Tensor, batch_size: int = 512) -> np.ndarray:
    """Most likely class of every preprocessed image."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(garments[i : i + batch_size]).argmax(1) for i in range(0, len(garments), batch_size)]
        ).numpy()


def train(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    config: ClassifierConfig,
    options: TrainOptions,
    log: Callable[[str], None] = print,
) -> tuple[GarmentClassifier, dict]:
    """Train a classifier and return it with its classification report on the test images."""
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    started = time.monotonic()
    train_x, test_x = preprocess(train_images), preprocess(test_images)
    train_y = torch.from_numpy(train_labels.astype(np.int64))
    log(
        f"preprocessed {len(train_x)} training and {len(test_x)} test images "
        f"in {time.monotonic() - started:.0f}s"
    )
    model = GarmentClassifier(config)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=options.learning_rate,
        momentum=options.momentum,
        nesterov=True,
        weight_decay=options.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train_x) / options.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.epochs * steps_per_epoch)
    for epoch in range(1, options.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), options.batch_size):
            index = order[start : start + options.batch_size]
            if len(index) < 2:  # batch norm needs two samples
                continue
            x = train_x[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
        accuracy = float((predict(model, test_x) == test_labels).mean())
        log(
            f"epoch {epoch}/{options.epochs}: loss {total_loss / len(train_x):.4f}, "
            f"test accuracy {accuracy:.4f}, lr {schedule.get_last_lr()[0]:.5f}"
        )
    return model, classification_report(test_labels, predict(model, test_x))


def save_checkpoint(path: Path, model: GarmentClassifier, report: dict, details: dict) -> None:
    """{'state_dict', 'config', 'classes', 'report', ...details}; written to a temp file, then renamed."""
    tmp = path.with_name(path.name + ".partial")
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": model.config.to_dict(),
            "classes": list(CLASSES),
            "report": report,
            **details,
        },
        tmp,
    )
    tmp.replace(path)


def load_classifier(path: Path) -> tuple[GarmentClassifier, dict]:
    """A classifier from a checkpoint written by `save_checkpoint` (strict), and the checkpoint's
    metadata (config, classes, report, ...)."""
    state_dict = read_state_dict(path)
    metadata = torch.load(path, map_location="cpu", weights_only=True)
    metadata.pop("state_dict")
    if metadata.get("classes") != list(CLASSES):
        raise CheckpointError(f"{path}: not a Fashion-MNIST garment classifier checkpoint (classes differ)")
    model = GarmentClassifier(ClassifierConfig(**metadata["config"]))
    load_strict(model, state_dict, f"garment classifier checkpoint {path.name}")
    return model.eval(), metadata
