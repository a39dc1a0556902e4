"""The garment gate in front of try-on: ask the served `garment_classifier` what a garment photo shows
and refuse what the try-on model cannot dress (it was trained on upper-body garments only)."""

from dataclasses import dataclass

import numpy as np

from fashionserve.catalogue.networks.classifier import CLASSES, UPPER_BODY
from fashionserve.client import TritonModelClient

GATE_MODEL = "garment_classifier"
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Verdict:
    """The classifier's answer for one garment photo."""

    label: int
    confidence: float

    @property
    def name(self) -> str:
        return CLASSES[self.label]

    @property
    def upper_body(self) -> bool:
        return self.label in UPPER_BODY

    def refused(self, threshold: float) -> bool:
        """Refuse a garment the classifier confidently places outside the upper-body classes; an
        unsure answer (softmax is over-confident anyway, and has no 'other' class) lets it through."""
        return not self.upper_body and self.confidence >= threshold


def classify(client: TritonModelClient, images: np.ndarray) -> list[Verdict]:
    """Verdicts for uint8 [N, H, W, 3] photos (one size per call) from a `garment_classifier` client."""
    outputs = client.infer({"image": images})
    return [
        Verdict(int(label[0]), float(probabilities[label[0]]))
        for probabilities, label in zip(outputs["probabilities"], outputs["label"], strict=True)
    ]
