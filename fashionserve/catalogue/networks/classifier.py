"""Garment classifier: a small CNN for Fashion-MNIST's 10 classes (its preprocessing of product photos is
`fashionserve.catalogue.stages.GarmentPreprocess`)."""

from dataclasses import asdict, dataclass

from torch import Tensor, nn

CLASSES = (
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
)  # Fashion-MNIST label order
# What the try-on model (HR-VITON, trained on frontal tops) can dress; dresses are refused too.
UPPER_BODY = frozenset({0, 2, 4, 6})
IMAGE_SIZE = 28
# Fashion-MNIST training-set pixel mean and std (on the 0..1 scale), used to standardize inputs
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530


@dataclass(frozen=True)
class ClassifierConfig:
    """Width of the garment classifier; the defaults are the published configuration of this repo."""

    width: int = 32  # channels of the first block; the second has twice as many
    hidden: int = 128
    dropout: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(inputs: int, outputs: int) -> nn.Sequential:
    """Two 3x3 conv + batch norm + ReLU, then 2x2 max pooling."""
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class GarmentClassifier(nn.Module):
    """Two conv+pool blocks and a two-layer head: [N, 1, 28, 28] in 0..1 -> [N, 10] logits."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        width = config.width
        self.features = nn.Sequential(_conv_block(1, width), _conv_block(width, 2 * width))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(2 * width * (IMAGE_SIZE // 4) ** 2, config.hidden, bias=False),
            nn.BatchNorm1d(config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, len(CLASSES)),
        )

    def embedding(self, garment: Tensor) -> Tensor:
        """The hidden units before the last linear layer, [N, hidden] (features for an FID-style
        distance)."""
        return self.head[:-1](self.features((garment - PIXEL_MEAN) / PIXEL_STD))

    def forward(self, garment: Tensor) -> Tensor:
        return self.head[-1](self.embedding(garment))
