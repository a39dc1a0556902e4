"""The hair pipeline as PyTorch modules, one per Triton model, and the two ensembles they make up.

`hair_transfer` is HairFastGAN's inference path (AIRI-Institute/HairFastGAN @
49e98019c9243d1991c19d45764fc3340a498de2: `hair_swap.py`, `models/{Embedding,Alignment,Blending}.py`)
on a face, a shape reference and a colour reference:

    embedding (each image): hair_preprocess -> hair_encoder (e4e: W), hair_fs_encoder (FS: S, F),
        hair_parser -> hair_labels (mask), hair_w_features (F from W) -> hair_embed_mix (F)
    pose and shape (shape and colour reference): hair_rotate -> hair_generator -> hair_generated_labels
        -> hair_shape_target (target hair mask)
    shape alignment (face and shape reference): hair_inpaint (SEAN on the target mask) -> hair_encoder
        -> hair_w_features -> hair_align_features (F aligned to the target shape)
    colour: hair_color_blend (CLIP + blending encoder: S) -> hair_blend_synthesis (image)
    refinement: hair_post_process (S, F) -> hair_final_synthesis (image)

`hair_edit` (InterFaceGAN directions on the e4e W+) shares the encoder, generator and parser:

    hair_preprocess -> hair_encoder -> hair_edit_latent -> hair_generator
        -> hair_generated_preprocess -> hair_parser (portrait and generated) -> hair_composite

Upstream skips steps when images are the same (`equal_replacer` makes equal inputs one object, then
`is` tests pick the branch): no rotation, shape or inpainting when the face is the shape reference, no
colour blending and no F mixing when all three are one image. Here `hair_same_images` computes those
facts per sample (uint8 equality, which is what `torch.allclose` on x / 255 amounts to) and the stages
select the upstream result per sample: every path runs, one ensemble serves every case, batches mix
cases freely. The cost is the skipped work, paid only by requests with repeated images.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashionserve.hair.networks.blending import ColorBlending, HairMaskMorphology
from fashionserve.hair.networks.feature_style_encoder import F_BLOCK, FeatureStyleEmbedding
from fashionserve.hair.networks.parser import (
    CELEBAMASK_CLASSES,
    FaceParser,
    hair_and_face_masks,
    normalize_images,
)
from fashionserve.hair.networks.post_process import F_START_BLOCK, PostProcess
from fashionserve.hair.networks.rotate import RotateModel
from fashionserve.hair.networks.sean import SEANInpainter
from fashionserve.hair.networks.shape_adaptor import HAIR_CLASS, ShapeAdaptor
from fashionserve.hair.networks.stylegan2 import PartialSynthesis, StyleGAN2Generator

WORK_SIZE = 256  # upstream's `image_256`: masks, SEAN, e4e, CLIP and post-process all work at 256 px
MIXING = 0.95  # hair_swap.py --mixing: share of e4e's F in the hair region of every image's F
BLEND_BLOCK = 4  # the colour-blended image: generator blocks 4..8 from the aligned F (start_layer=4)
BICUBIC_A = -0.5  # utils/bicubic.py's kernel parameter
# CtrlHair's label order (global_value_utils.PARSING_LABEL_LIST), which every HairFastGAN mask uses; BiSeNet
# names its classes in face-parsing.PyTorch's order (parser.CELEBAMASK_CLASSES, 'skin' = 'skin_other').
CTRLHAIR_LABELS = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip


@dataclass(frozen=True)
class HairConfig:
    """Sizes of the hair pipeline. `image_size` is the side of the aligned portraits served and of the
    StyleGAN2 generator (1024 public; a power of two >= 256, since the work size is 256). `widths`
    picks the networks' channel widths: "public" (the released files) or "tiny" (CI; random-init)."""

    image_size: int = 1024
    widths: str = "public"

    def __post_init__(self) -> None:
        size = self.image_size
        if size < WORK_SIZE or size & (size - 1):
            raise ValueError(f"image size must be a power of two of at least {WORK_SIZE}, got {size}")
        if self.widths not in NETWORK_WIDTHS:
            raise ValueError(f"widths must be one of {sorted(NETWORK_WIDTHS)}, got {self.widths!r}")

    @property
    def n_latent(self) -> int:
        """W+ / S layers of the generator: 2 * log2(size) - 2 (18 at 1024)."""
        return 2 * int(math.log2(self.image_size)) - 2

    @property
    def parser_size(self) -> int:
        """BiSeNet's input side for the portraits (upstream: the 2x bicubic downsample, 512)."""
        return self.image_size // 2

    @property
    def style_dim(self) -> int:
        return NETWORK_WIDTHS[self.widths]["style_dim"]

    def to_dict(self) -> dict:
        return {**asdict(self), "n_latent": self.n_latent, "parser_size": self.parser_size,
                "networks": NETWORK_WIDTHS[self.widths]}  # fmt: skip


# Keyword arguments of each network per width preset. "public" are the released files' shapes;
# "tiny" keeps every spatial size and layer count and shrinks channels (e4e needs style_dim = 8 x width,
# its width a multiple of 16; FS and post-process content channels equal the generator's at 16 and 64 px).
NETWORK_WIDTHS: dict[str, dict] = {
    "public": {
        "style_dim": 512, "n_mlp": 8, "channel_max": 512, "e4e": {"base_width": 64},
        "fs": {"content_channels": 512, "width": 64}, "post_process": {"content_channels": 512, "width": 64},
        "shape_adaptor": {}, "sean": {}, "clip": {}, "blending_middle": 1024,
    },
    "tiny": {
        "style_dim": 128, "n_mlp": 2, "channel_max": 16,
        "e4e": {"base_width": 16, "stage_units": (1, 1, 1, 1)},
        "fs": {"content_channels": 16, "width": 8, "units": (1, 1, 1, 1)},
        "post_process": {"content_channels": 16, "width": 8, "units": (1, 1, 1, 1)},
        "shape_adaptor": {"hair_dim": 4, "face_dim": 8, "base": 4, "max_channels": 16},
        "sean": {"ngf": 2, "style_length": 8, "spade_hidden": 4, "zencoder_ngf": 2},
        "clip": {"resolution": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4, "output_dim": 16},
        "blending_middle": 32,
    },
}  # fmt: skip


def _cubic(x: float) -> float:
    """utils/bicubic.py's kernel (Keys, a = -0.5)."""
    x, a = abs(x), BICUBIC_A
    if x <= 1.0:
        return (a + 2.0) * x**3 - (a + 3.0) * x**2 + 1.0
    if x < 2.0:
        return a * x**3 - 5.0 * a * x**2 + 8.0 * a * x - 4.0 * a
    return 0.0


class BicubicDownsample(nn.Module):
    """HairFastGAN's BicubicDownSample: a separable 4*factor-tap bicubic filter with stride `factor` over
    reflect-padded rows, then columns; [N, C, H, W] -> [N, C, H / factor, W / factor]."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        taps = 4 * factor
        kernel = torch.tensor([_cubic((i - taps // 2 + 0.5) / factor) for i in range(taps)])
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)
        padding = taps - factor
        self.pad_before, self.pad_after = padding // 2, padding - padding // 2

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        rows = self.kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        x = F.pad(x, (0, 0, self.pad_before, self.pad_after), mode="reflect")
        x = F.conv2d(x, rows, stride=(self.factor, 1), groups=channels)
        x = F.pad(x, (self.pad_before, self.pad_after, 0, 0), mode="reflect")
        return F.conv2d(x, rows.transpose(2, 3), stride=(1, self.factor), groups=channels)


def hair_mask(labels: Tensor) -> Tensor:
    """CtrlHair-order label map -> float 0/1 hair mask of the same shape."""
    return (labels == HAIR_CLASS).float()


def _per_sample(flag: Tensor, like: Tensor) -> Tensor:
    """[N, 1] 0/1 flag -> boolean broadcastable over `like` (N first)."""
    return flag.view(-1, *([1] * (like.dim() - 1))) > 0.5


class HairSameImages(nn.Module):
    """uint8 face, shape reference, colour reference [N, S, S, 3] -> (same_shape, same_color) [N, 1]
    float 0/1: whether the face is the shape reference, and the colour reference."""

    def forward(
        self, face: Tensor, shape_reference: Tensor, color_reference: Tensor
    ) -> tuple[Tensor, Tensor]:
        def same(a: Tensor, b: Tensor) -> Tensor:
            return (a != b).flatten(1).sum(dim=1, keepdim=True, dtype=torch.int64).eq(0).float()

        return same(face, shape_reference), same(face, color_reference)


class HairPreprocess(nn.Module):
    """uint8 portrait [N, S, S, 3] -> the networks' inputs, as Embedding.py makes them:
    fs_input (the image in [-1, 1], FS encoder), encoder_input (`image_norm_256`, the 256 px bicubic
    downsample in [-1, 1]: e4e, CLIP, post-process), image_256 (the same in [0, 1]: SEAN) and
    parser_input (the 2x bicubic downsample, ImageNet-normalized: BiSeNet)."""

    def __init__(self, config: HairConfig):
        super().__init__()
        self.to_work_size = BicubicDownsample(config.image_size // WORK_SIZE)
        self.to_parser_size = BicubicDownsample(2)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        unit = image.permute(0, 3, 1, 2).float() / 255.0
        image_256 = self.to_work_size(unit)
        return unit * 2.0 - 1.0, image_256 * 2.0 - 1.0, image_256, normalize_images(self.to_parser_size(unit))


class HairLabels(nn.Module):
    """BiSeNet logits [N, 19, H, W] -> labels [N, 1, 256, 256] int64 in CtrlHair order (Net.get_segmentation:
    argmax, swap_parsing_label_to_celeba_mask, nearest resize to 256)."""

    def __init__(self):
        super().__init__()
        to_ctrlhair = torch.tensor([CTRLHAIR_LABELS.index(name) for name in CELEBAMASK_CLASSES])
        self.register_buffer("to_ctrlhair", to_ctrlhair, persistent=False)

    def forward(self, parsing: Tensor) -> Tensor:
        labels = self.to_ctrlhair[parsing.argmax(dim=1, keepdim=True)]
        return F.interpolate(labels.float(), size=(WORK_SIZE, WORK_SIZE), mode="nearest").long()


class HairGeneratedLabels(nn.Module):
    """A generated image [N, 3, S, S] (about [-1, 1]) -> its labels [N, 1, 256, 256] (Alignment.py: to
    [0, 1], clipped, ImageNet-normalized, parsed at the generator's resolution)."""

    def __init__(self, parser: FaceParser):
        super().__init__()
        self.parser = parser
        self.labels = HairLabels()

    def forward(self, generated: Tensor) -> Tensor:
        return self.labels(self.parser(normalize_images(((generated + 1.0) / 2.0).clip(0.0, 1.0))))


class HairEmbedMix(nn.Module):
    """Embedding.py's mixing: in the hair region (the mask bicubic-resized to F's 32 x 32), F moves MIXING
    of the way to e4e's F; skipped when face, shape and colour are one image."""

    def forward(
        self, features: Tensor, w_features: Tensor, labels: Tensor, same_shape: Tensor, same_color: Tensor
    ) -> Tensor:
        size = features.shape[-2:]
        region = F.interpolate(hair_mask(labels), size=size, mode="bicubic", align_corners=False)
        mixed = features + MIXING * region * (w_features - features)
        return torch.where(_per_sample(same_shape * same_color, features), features, mixed)


class HairShapeTarget(nn.Module):
    """Alignment.shape_module's target mask: the shape adaptor's mask from the face's labels and the
    labels of the reference turned to the face's pose; the face's own labels when it is the reference."""

    def __init__(self, shape_adaptor: ShapeAdaptor):
        super().__init__()
        self.shape_adaptor = shape_adaptor

    def forward(self, face_labels: Tensor, rotated_labels: Tensor, same: Tensor) -> Tensor:
        target = self.shape_adaptor(face_labels, rotated_labels)
        return torch.where(_per_sample(same, target), face_labels, target)


class HairAlignFeatures(nn.Module):
    """Alignment.align_images' F-space blend: F of the face, F of the SEAN-inpainted face and of the
    inpainted shape reference (both e4e-encoded), and F of the shape reference, combined through three
    masks (dilated face-or-target hair, eroded target hair, eroded shape-and-target hair) resized to F's
    size. The face's F when it is the shape reference."""

    def __init__(self, smooth: int):
        super().__init__()
        self.morphology = HairMaskMorphology(smooth)

    def forward(
        self,
        face_features: Tensor,
        shape_features: Tensor,
        face_inpainted_features: Tensor,
        shape_inpainted_features: Tensor,
        face_labels: Tensor,
        shape_labels: Tensor,
        target_labels: Tensor,
        same_shape: Tensor,
    ) -> Tensor:
        face_hair, shape_hair, target_hair = (
            hair_mask(face_labels),
            hair_mask(shape_labels),
            hair_mask(target_labels),
        )
        free = (
            self.morphology.dilate(1 - (1 - face_hair) * (1 - target_hair)),
            self.morphology.erode(target_hair),
            self.morphology.erode(shape_hair * target_hair),
        )
        size = face_features.shape[-2:]
        keep = [1 - F.interpolate(mask, size=size, mode="bicubic", align_corners=False) for mask in free]
        aligned = face_inpainted_features + keep[0] * (face_features - face_inpainted_features)
        aligned = shape_inpainted_features + keep[1] * (aligned - shape_inpainted_features)
        aligned = shape_features + keep[2] * (aligned - shape_features)
        return torch.where(_per_sample(same_shape, aligned), face_features, aligned)


class HairColorBlend(nn.Module):
    """Blending.blend_images up to S_blend: the colour network on the face's and the colour reference's S
    and images, with their hair masks and the target hair mask of the colour step; the face's S when all
    three images are one."""

    def __init__(self, color_blending: ColorBlending):
        super().__init__()
        self.color_blending = color_blending

    def forward(
        self,
        face_style: Tensor,
        color_style: Tensor,
        face_image: Tensor,
        color_image: Tensor,
        face_labels: Tensor,
        color_labels: Tensor,
        color_target_labels: Tensor,
        same_shape: Tensor,
        same_color: Tensor,
    ) -> Tensor:
        blended = self.color_blending(
            face_style, color_style, face_image, color_image,
            hair_mask(face_labels), hair_mask(color_labels), hair_mask(color_target_labels),
        )  # fmt: skip
        return torch.where(_per_sample(same_shape * same_color, blended), face_style, blended)


class HairPostProcess(nn.Module):
    """Blending.py's refinement input: the face's `image_norm_256` and the blended image, downsampled to
    256 (bicubic) -> (S_final, F_final) of the post-process network."""

    def __init__(self, config: HairConfig, post_process: PostProcess):
        super().__init__()
        self.to_work_size = BicubicDownsample(config.image_size // WORK_SIZE)
        self.post_process = post_process

    def forward(self, face_image: Tensor, blended: Tensor) -> tuple[Tensor, Tensor]:
        return self.post_process(face_image, self.to_work_size(blended))


class HairFinalSynthesis(nn.Module):
    """Generator blocks 5..8 from F_final with S_final -> the served uint8 image [N, S, S, 3]
    (upstream's ((x + 1) / 2).clip(0, 1), scaled to 0..255 and rounded)."""

    def __init__(self, generator: StyleGAN2Generator):
        super().__init__()
        self.synthesis = PartialSynthesis(generator, F_START_BLOCK)

    def forward(self, style: Tensor, features: Tensor) -> Tensor:
        unit = ((self.synthesis(style, features) + 1.0) / 2.0).clip(0.0, 1.0)
        return (unit * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)


class HairGeneratedPreprocess(nn.Module):
    """hair_edit: the generator's [-1, 1] image -> the parser's input at the portraits' parser size."""

    def __init__(self, config: HairConfig):
        super().__init__()
        self.parser_size = config.parser_size

    def forward(self, generated: Tensor) -> Tensor:
        unit = (generated.clamp(-1.0, 1.0) + 1.0) * 0.5
        size = (self.parser_size, self.parser_size)
        return normalize_images(F.interpolate(unit, size=size, mode="bilinear", antialias=True))


class HairEditLatent(nn.Module):
    """InterFaceGAN-style edit: W+ + strength * direction (direction per layer, N x n_latent x style_dim;
    the client repeats a single style_dim direction over the layers)."""

    def forward(self, latent: Tensor, direction: Tensor, strength: Tensor) -> Tensor:
        return latent + strength.unsqueeze(-1) * direction


class HairComposite(nn.Module):
    """hair_edit: paste the edited hair into the portrait at the portrait's resolution.

    Hard masks come from the parser's argmax on both images. The replaced region is the generated
    image's hair plus the portrait's hair outside the portrait's face (old hair that the new style does
    not cover shows the generated background there); the face stays the user's wherever the new hair
    does not fall on it (bangs). The region is feathered with a gaussian (sigma parser size / 64) and
    scaled to the portrait's size; outside it the output is the portrait, bit for bit.
    """

    def __init__(self, config: HairConfig):
        super().__init__()
        self.image_size = config.image_size
        sigma = config.parser_size / 64
        self.radius = math.ceil(3 * sigma)
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        taps = torch.exp(-(offsets**2) / (2 * sigma**2))
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
        new = (generated.clamp(-1.0, 1.0) + 1.0) * 127.5
        old = portrait.permute(0, 3, 1, 2).float()
        blended = (old + mask * (new - old)).round().clamp(0.0, 255.0)
        return blended.permute(0, 2, 3, 1).to(torch.uint8)


@dataclass
class HairNetworks:
    """The networks of HairFastGAN's `pretrained_models/` tree (plus OpenAI's CLIP inside the colour step)."""

    e4e: nn.Module
    fs_encoder: nn.Module
    generator: StyleGAN2Generator
    parser: FaceParser
    rotate: RotateModel
    shape_adaptor: ShapeAdaptor
    inpainter: SEANInpainter
    color_blending: ColorBlending
    post_process: PostProcess


class HairPipeline(nn.Module):
    """The reference pipeline: the stages chained in PyTorch exactly as the two ensembles wire them."""

    def __init__(self, config: HairConfig, networks: HairNetworks, smooth: int):
        super().__init__()
        self.config = config
        self.networks = networks
        n = networks
        self.stages = nn.ModuleDict(
            {
                "hair_same_images": HairSameImages(),
                "hair_preprocess": HairPreprocess(config),
                "hair_encoder": n.e4e,
                "hair_fs_encoder": FeatureStyleEmbedding(n.fs_encoder, n.generator),
                "hair_parser": n.parser,
                "hair_labels": HairLabels(),
                "hair_w_features": PartialSynthesis(n.generator, 0, F_BLOCK),
                "hair_embed_mix": HairEmbedMix(),
                "hair_rotate": n.rotate,
                "hair_generator": n.generator,
                "hair_generated_labels": HairGeneratedLabels(n.parser),
                "hair_shape_target": HairShapeTarget(n.shape_adaptor),
                "hair_inpaint": n.inpainter,
                "hair_align_features": HairAlignFeatures(smooth),
                "hair_color_blend": HairColorBlend(n.color_blending),
                "hair_blend_synthesis": PartialSynthesis(n.generator, BLEND_BLOCK),
                "hair_post_process": HairPostProcess(config, n.post_process),
                "hair_final_synthesis": HairFinalSynthesis(n.generator),
                "hair_edit_latent": HairEditLatent(),
                "hair_generated_preprocess": HairGeneratedPreprocess(config),
                "hair_composite": HairComposite(config),
            }
        )

    def _embed(
        self, image: Tensor, same_shape: Tensor, same_color: Tensor, features: bool
    ) -> dict[str, Tensor]:
        """Embedding.py for one image; F (mixed) only where it is used: the face's and the shape's."""
        s = self.stages
        fs_input, encoder_input, image_256, parser_input = s["hair_preprocess"](image)
        latent = s["hair_encoder"](encoder_input)
        style, fs_features = s["hair_fs_encoder"](fs_input)
        labels = s["hair_labels"](s["hair_parser"](parser_input))
        embedding = {"latent": latent, "style": style, "labels": labels,
                     "encoder_input": encoder_input, "image_256": image_256}  # fmt: skip
        if features:
            w_features = s["hair_w_features"](latent)
            embedding["features"] = s["hair_embed_mix"](
                fs_features, w_features, labels, same_shape, same_color
            )
        return embedding

    def _target(self, face: dict[str, Tensor], reference: dict[str, Tensor], same: Tensor) -> Tensor:
        s = self.stages
        rotated = s["hair_generator"](s["hair_rotate"](reference["latent"], face["latent"]))
        return s["hair_shape_target"](face["labels"], s["hair_generated_labels"](rotated), same)

    def _inpainted_features(self, image: dict[str, Tensor], target_labels: Tensor) -> Tensor:
        s = self.stages
        inpainted = s["hair_inpaint"](image["image_256"], image["labels"], target_labels)
        return s["hair_w_features"](s["hair_encoder"](inpainted))

    def transfer(self, face: Tensor, shape_reference: Tensor, color_reference: Tensor) -> Tensor:
        """uint8 [N, S, S, 3] face, shape reference, colour reference -> the face with the shape
        reference's hairstyle in the colour reference's hair colour, uint8 [N, S, S, 3]."""
        s = self.stages
        same_shape, same_color = s["hair_same_images"](face, shape_reference, color_reference)
        f = self._embed(face, same_shape, same_color, features=True)
        sh = self._embed(shape_reference, same_shape, same_color, features=True)
        co = self._embed(color_reference, same_shape, same_color, features=False)
        shape_target = self._target(f, sh, same_shape)
        color_target = self._target(f, co, same_color)
        aligned = s["hair_align_features"](
            f["features"], sh["features"], self._inpainted_features(f, shape_target),
            self._inpainted_features(sh, shape_target), f["labels"], sh["labels"], shape_target, same_shape,
        )  # fmt: skip
        blended_style = s["hair_color_blend"](
            f["style"], co["style"], f["encoder_input"], co["encoder_input"], f["labels"], co["labels"],
            color_target, same_shape, same_color,
        )  # fmt: skip
        blended = s["hair_blend_synthesis"](blended_style, aligned)
        final_style, final_features = s["hair_post_process"](f["encoder_input"], blended)
        return s["hair_final_synthesis"](final_style, final_features)

    def edit(self, portrait: Tensor, direction: Tensor, strength: Tensor) -> Tensor:
        """uint8 portraits, directions (N x n_latent x style_dim), strengths (N x 1) -> edited portraits."""
        s = self.stages
        _, encoder_input, _, parser_input = s["hair_preprocess"](portrait)
        latent = s["hair_edit_latent"](s["hair_encoder"](encoder_input), direction, strength)
        generated = s["hair_generator"](latent)
        generated_parsing = s["hair_parser"](s["hair_generated_preprocess"](generated))
        portrait_parsing = s["hair_parser"](parser_input)
        return s["hair_composite"](portrait, generated, portrait_parsing, generated_parsing)
