"""The hair pipeline as PyTorch modules, one per Triton model, and the two ensembles they make up.

    hair_transfer: portrait, reference
        hair_preprocess (x2) -> hair_encoder (x2, independent) -> hair_mix -> hair_generator
        -> hair_generated_preprocess -> hair_parser (portrait and generated) -> hair_composite
    hair_edit: portrait, direction, strength
        hair_preprocess -> hair_encoder -> hair_edit_latent -> hair_generator
        -> hair_generated_preprocess -> hair_parser (portrait and generated) -> hair_composite

Inputs are face-aligned square crops (FFHQ alignment, as the encoder and generator were trained on).
The generator re-draws the whole face; only its hair is kept: `hair_composite` pastes the generated
image into the user's photo through a feathered mask of (generated hair) + (the user's old hair that is
not face), so the user's face, background and clothes stay the user's own pixels.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.hair.networks.parser import hair_and_face_masks, normalize_images

# Layers 0-3 of W+ drive the 4x4 and 8x8 synthesis blocks: pose, face shape and the general hair shape
# (StyleGAN's style-mixing study). They stay the user's, so that the generated head lines up with the
# photo it is pasted into.
FIRST_HAIR_LAYER = 4


def default_hair_layers(n_latent: int) -> tuple[int, ...]:
    """W+ layers taken from the reference: the middle ones (16x16-32x32: hairstyle) and the fine ones
    (64x64 and up: hair colour and texture), i.e. everything above the coarse pose/shape layers."""
    return tuple(range(FIRST_HAIR_LAYER, n_latent))


def parse_layers(text: str) -> tuple[int, ...]:
    """'4-17' or '4,5,6' or '4-7,10' -> sorted layer indices."""
    layers: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"layers must look like 4-17 or 4,5,6, got {text!r}") from None
    return tuple(sorted(layers))


@dataclass(frozen=True)
class HairConfig:
    """Sizes of a hair pipeline and its networks. Defaults are the public configuration: FFHQ StyleGAN2
    at 1024, e4e at 256, BiSeNet at 512, served images of 1024x1024."""

    image_size: int = 1024  # side of the square portraits clients send and receive
    generator_size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channel_max: int = 512
    encoder_input_size: int = 256
    encoder_num_layers: int = 50
    encoder_base_width: int = 64  # e4e body width; style_dim must be 8x it (512 = 8 x 64, as public)
    encoder_stage_units: tuple[int, int, int, int] | None = None  # IR-SE-50's (3, 4, 14, 3) by default
    parser_size: int = 512
    # W+ layers taken from the reference in hair_transfer (default: default_hair_layers)
    hair_layers: tuple[int, ...] = field(default=())
    # gaussian sigma of the composite's mask feathering, in parser pixels (default: parser_size / 64)
    feather_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.generator_size < 8 or self.generator_size & (self.generator_size - 1):
            raise ValueError(f"generator size must be a power of two >= 8, got {self.generator_size}")
        if self.parser_size % 32:
            raise ValueError(f"parser size must be a multiple of 32, got {self.parser_size}")
        if self.image_size < 16:
            raise ValueError(f"image size must be at least 16, got {self.image_size}")
        if not self.hair_layers:
            object.__setattr__(self, "hair_layers", default_hair_layers(self.n_latent))
        bad = [layer for layer in self.hair_layers if not 0 <= layer < self.n_latent]
        if bad:
            raise ValueError(f"hair layers {bad} are outside 0..{self.n_latent - 1} (W+ of {self.n_latent})")
        if self.feather_sigma < 0:
            raise ValueError(f"feather sigma must be positive, got {self.feather_sigma:g}")
        if not self.feather_sigma:
            object.__setattr__(self, "feather_sigma", self.parser_size / 64)

    @property
    def n_latent(self) -> int:
        """W+ layers of the generator: 2 * log2(size) - 2 (18 at 1024)."""
        return 2 * int(math.log2(self.generator_size)) - 2

    def to_dict(self) -> dict:
        return {**asdict(self), "hair_layers": list(self.hair_layers), "n_latent": self.n_latent}


def _resize(image: Tensor, size: int) -> Tensor:
    """Square resize like PIL's bilinear (antialiased when shrinking), as the public preprocessing does."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)


def _to_parser_input(unit_image: Tensor, parser_size: int) -> Tensor:
    """[0, 1] RGB -> the parser's input: resized like the public test script, ImageNet-normalized."""
    return normalize_images(_resize(unit_image, parser_size))


class HairPreprocess(nn.Module):
    """uint8 N x S x S x 3 portrait -> the encoder's input ([-1, 1], as e4e's Normalize(0.5, 0.5)) and
    the parser's input (ImageNet-normalized), each at its network's size."""

    def __init__(self, config: HairConfig):
        super().__init__()
        self.encoder_size = config.encoder_input_size
        self.parser_size = config.parser_size

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        unit = image.permute(0, 3, 1, 2).float() / 255.0
        return _resize(unit, self.encoder_size) * 2.0 - 1.0, _to_parser_input(unit, self.parser_size)


class HairGeneratedPreprocess(nn.Module):
    """The generator's [-1, 1] image -> the parser's input, so the new hair can be found in it."""

    def __init__(self, config: HairConfig):
        super().__init__()
        self.parser_size = config.parser_size

    def forward(self, generated: Tensor) -> Tensor:
        return _to_parser_input((generated.clamp(-1.0, 1.0) + 1.0) * 0.5, self.parser_size)


class HairMix(nn.Module):
    """W+ of the portrait and of the reference -> W+ with the reference's hair layers."""

    def __init__(self, config: HairConfig):
        super().__init__()
        from_reference = torch.zeros(1, config.n_latent, 1, dtype=torch.bool)
        from_reference[0, list(config.hair_layers)] = True
        self.register_buffer("from_reference", from_reference)

    def forward(self, portrait_latent: Tensor, reference_latent: Tensor) -> Tensor:
        return torch.where(self.from_reference, reference_latent, portrait_latent)


class HairEditLatent(nn.Module):
    """InterFaceGAN-style edit: W+ + strength * direction (direction per layer, N x n_latent x style_dim;
    the client repeats a single style_dim direction over the layers)."""

    def forward(self, latent: Tensor, direction: Tensor, strength: Tensor) -> Tensor:
        return latent + strength.unsqueeze(-1) * direction


class HairComposite(nn.Module):
    """Paste the generated hair into the portrait at the portrait's resolution.

    Hard masks come from the parser's argmax on both images. The replaced region is the generated
    image's hair plus the portrait's hair outside the portrait's face (old hair that the new style does
    not cover shows the generated background there); the face stays the user's wherever the new hair
    does not fall on it (bangs). The region is feathered with a gaussian at the parser's resolution and
    scaled to the portrait's; outside it the output is the portrait, bit for bit.
    """

    def __init__(self, config: HairConfig):
        super().__init__()
        self.image_size = config.image_size
        self.radius = math.ceil(3 * config.feather_sigma)
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        taps = torch.exp(-(offsets**2) / (2 * config.feather_sigma**2))
        taps = (taps / taps.sum()).float()
        self.register_buffer("blur_vertical", taps.view(1, 1, -1, 1))
        self.register_buffer("blur_horizontal", taps.view(1, 1, 1, -1))

    def region(self, portrait_parsing: Tensor, generated_parsing: Tensor) -> Tensor:
        """N x 1 x P x P: 1 where the generated image replaces the portrait (before feathering)."""
        portrait_hair, portrait_face = hair_and_face_masks(portrait_parsing)
        generated_hair, _ = hair_and_face_masks(generated_parsing)
        return torch.maximum(generated_hair, portrait_hair * (1.0 - portrait_face))

    def feather(self, region: Tensor) -> Tensor:
        """Separable gaussian with edge padding (hair at the border stays fully replaced)."""
        r = self.radius
        x = F.conv2d(F.pad(region, (0, 0, r, r), mode="replicate"), self.blur_vertical)
        return F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), self.blur_horizontal)

    def forward(
        self, portrait: Tensor, generated: Tensor, portrait_parsing: Tensor, generated_parsing: Tensor
    ) -> Tensor:
        size = (self.image_size, self.image_size)
        mask = self.feather(self.region(portrait_parsing, generated_parsing))
        mask = F.interpolate(mask, size=size, mode="bilinear").clamp(0.0, 1.0)
        new = (_resize(generated.clamp(-1.0, 1.0), self.image_size) + 1.0) * 127.5
        old = portrait.permute(0, 3, 1, 2).float()
        blended = (old + mask * (new - old)).round().clamp(0.0, 255.0)
        return blended.permute(0, 2, 3, 1).to(torch.uint8)


class HairPipeline(nn.Module):
    """The reference pipeline: the stages chained in PyTorch, uint8 in, uint8 out, for both ensembles."""

    def __init__(
        self,
        config: HairConfig,
        encoder: nn.Module,
        generator: nn.Module,
        parser: nn.Module,
    ):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleDict(
            {
                "hair_preprocess": HairPreprocess(config),
                "hair_encoder": encoder,
                "hair_parser": parser,
                "hair_mix": HairMix(config),
                "hair_edit_latent": HairEditLatent(),
                "hair_generator": generator,
                "hair_generated_preprocess": HairGeneratedPreprocess(config),
                "hair_composite": HairComposite(config),
            }
        )

    def _finish(self, portrait: Tensor, portrait_parser_input: Tensor, latent: Tensor) -> Tensor:
        s = self.stages
        generated = s["hair_generator"](latent)
        generated_parsing = s["hair_parser"](s["hair_generated_preprocess"](generated))
        portrait_parsing = s["hair_parser"](portrait_parser_input)
        return s["hair_composite"](portrait, generated, portrait_parsing, generated_parsing)

    def transfer(self, portrait: Tensor, reference: Tensor) -> Tensor:
        """uint8 portraits and reference portraits (N x S x S x 3) -> portraits with the reference hair."""
        s = self.stages
        portrait_encoder_input, portrait_parser_input = s["hair_preprocess"](portrait)
        reference_encoder_input, _ = s["hair_preprocess"](reference)
        latent = s["hair_mix"](
            s["hair_encoder"](portrait_encoder_input), s["hair_encoder"](reference_encoder_input)
        )
        return self._finish(portrait, portrait_parser_input, latent)

    def edit(self, portrait: Tensor, direction: Tensor, strength: Tensor) -> Tensor:
        """uint8 portraits, directions (N x n_latent x style_dim), strengths (N x 1) -> edited portraits."""
        s = self.stages
        encoder_input, parser_input = s["hair_preprocess"](portrait)
        latent = s["hair_edit_latent"](s["hair_encoder"](encoder_input), direction, strength)
        return self._finish(portrait, parser_input, latent)
