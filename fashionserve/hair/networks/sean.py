"""HairFastGAN inpainting (`sean_checkpoints/CelebA-HQ_pretrained/latest_net_G.pth`): the SEAN generator
at 256 px, module names matching the released file, with its per-sample / per-class Python loops
rewritten as tensor operations so it exports to ONNX with a dynamic batch.

Follows AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2, vendored SEAN
(`models/sean_codes/models/networks/{generator,architecture,normalization}.py`, `pix2pix_model.py`
SEAN_OPT: netG 'spade', ngf 64, crop 256, 19 labels, norm_G 'spectralspadesyncbatch3x3', 'normal'
upsampling) as `models/Alignment.py` calls it:
- `encode_sean`: the Zencoder gives a [N, 512, 128, 128] code map; each class's style code is the mean
  of the map over that class's pixels (label map resized with nearest), all-zero for absent classes.
  Upstream loops over samples and classes with masked_select; here it is one masked mean pooling.
- `decode_sean`: every class whose code is all zero takes the class's mean style code (upstream reads
  them per call from `median/<class>/ACE.npy`; here a buffer loaded once), then the generator renders the
  target label map. Each ACE block writes relu(fc_mu<class>(code)) onto the class's pixels (upstream: a
  masked_scatter_ loop over classes for sample 0 only; here, per sample, the conv of that map is
  computed from the one-hot planes, see conv_of_style_map), blends the conv of that map with SPADE's
  gamma/beta by sigmoid(blending_*), and
  normalises with batch norm on its running statistics (synchronized batch norm in eval mode).
- Each ACE adds per-pixel Gaussian noise scaled per channel by `noise_var` (upstream draws it on every
  call). `noise=True` keeps that, in upstream's draw order and shape; `noise=False` leaves it out for a
  deterministic stage.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from fashionserve.checkpoints import CheckpointError, load_strict, read_state_dict
from fashionserve.onnx_export import converge_spectral_norms, fold_spectral_norms

NUM_CLASSES = 19
UPSAMPLINGS = 5  # 'normal': the label map enters at crop_size / 2**5
LEAKY_SLOPE = 0.2
BATCH_NORM_EPS = 1e-5
# Where a HairFastGAN checkout keeps SEAN's per-class mean style codes; load_average_feature reads the
# `median` set (`mean` beside it is unused). The files are in the code repository, not the weights tree.
MEAN_STYLE_CODES = Path("models/sean_codes/styles_test/mean_style_code/median")
STYLE_CODE_FILE = "ACE.npy"


def one_hot_labels(labels: Tensor, classes: int) -> Tensor:
    """[N, 1, H, W] integer label map -> [N, classes, H, W] float one-hot (out-of-range labels: all zero)."""
    index = torch.arange(classes, device=labels.device).view(1, -1, 1, 1)
    return (labels.long() == index).float()


def class_patches(planes: Tensor) -> Tensor:
    """[N, K, H, W] -> [N, K * 9, H * W]: each plane's 3x3 neighbourhoods (zero padding), index k * 9 + t
    with t = 3 * dy + dx, i.e. im2col for a 3x3 convolution with padding 1 (slices, no Unfold op)."""
    height, width = planes.shape[2:]
    padded = F.pad(planes, (1, 1, 1, 1))
    shifts = [padded[:, :, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return torch.stack(shifts, dim=2).flatten(1, 2).flatten(2)


def conv_of_style_map(conv: nn.Conv2d, vectors: Tensor, planes: Tensor, patches: Tensor) -> Tensor:
    """conv(style map) for the style map sum_k planes_k * vectors[:, k] (upstream's masked_scatter_
    result), computed without building it. A convolution is linear in its input channels, so it equals a
    3x3 convolution of the K class planes with per-sample weights W . vectors[:, k]: K instead of
    style_length (19 vs 512) input channels. vectors [N, K, style], planes [N, K, H, W] and their
    class_patches. Returns [N, out_channels, H, W]."""
    out_channels, style_length = conv.weight.shape[:2]
    taps = conv.weight.permute(0, 2, 3, 1).reshape(out_channels * 9, style_length)  # [O * 9, style]
    weights = (taps @ vectors.transpose(1, 2)).unflatten(1, (out_channels, 9))  # [N, O, 9, K]
    weights = weights.transpose(2, 3).flatten(2)  # [N, O, K * 9], index k * 9 + t as the patches
    out = weights @ patches + conv.bias.view(1, -1, 1)  # [N, O, H * W]
    return out.unflatten(2, planes.shape[2:])


class SPADE(nn.Module):
    """gamma, beta = mlp_gamma / mlp_beta of ReLU(conv(label map)). `param_free_norm` holds checkpoint
    statistics that upstream SPADE never applies (ACE normalises before calling it)."""

    def __init__(self, channels: int, label_nc: int, hidden: int):
        super().__init__()
        self.param_free_norm = nn.BatchNorm2d(channels, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def forward(self, segmentation: Tensor) -> tuple[Tensor, Tensor]:
        actv = self.mlp_shared(segmentation)
        return self.mlp_gamma(actv), self.mlp_beta(actv)


class ACE(nn.Module):
    """SEAN's normalisation: BN(x + noise) * (1 + gamma) + beta, gamma/beta blended from per-class style
    codes (when `use_rgb`) and from SPADE on the label map."""

    def __init__(
        self, channels: int, label_nc: int, style_length: int, hidden: int, use_rgb: bool, noise: bool
    ):
        super().__init__()
        self.use_rgb, self.noise, self.label_nc = use_rgb, noise, label_nc
        self.blending_gamma = nn.Parameter(torch.zeros(1))
        self.blending_beta = nn.Parameter(torch.zeros(1))
        self.noise_var = nn.Parameter(torch.zeros(channels))
        self.Spade = SPADE(channels, label_nc, hidden)
        self.param_free_norm = nn.BatchNorm2d(channels, affine=False)
        if use_rgb:
            for label in range(label_nc):
                self.add_module(f"fc_mu{label}", nn.Linear(style_length, style_length))
            self.conv_gamma = nn.Conv2d(style_length, channels, kernel_size=3, padding=1)
            self.conv_beta = nn.Conv2d(style_length, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, segmentation: Tensor, style_codes: Tensor) -> Tensor:
        if self.noise:
            # Upstream draws randn(N, W, H, 1) and transposes dims 1 and 3: one value per pixel.
            batch, _, height, width = x.shape
            field = torch.randn(batch, width, height, 1, dtype=x.dtype, device=x.device).permute(0, 3, 2, 1)
            x = x + field * self.noise_var.view(1, -1, 1, 1)
        normalized = F.batch_norm(
            x, self.param_free_norm.running_mean, self.param_free_norm.running_var, eps=BATCH_NORM_EPS
        )
        segmentation = F.interpolate(segmentation, size=x.shape[2:], mode="nearest")
        gamma, beta = self.Spade(segmentation)
        if self.use_rgb:
            # [N, classes, style]: relu(fc_mu<k>(code of class k)); upstream scatters each onto class k's
            # pixels and convolves that style map, conv_of_style_map gives the same from the planes.
            vectors = torch.stack(
                [F.relu(getattr(self, f"fc_mu{k}")(style_codes[:, k])) for k in range(self.label_nc)], dim=1
            )
            patches = class_patches(segmentation)
            gamma_alpha, beta_alpha = torch.sigmoid(self.blending_gamma), torch.sigmoid(self.blending_beta)
            gamma_style = conv_of_style_map(self.conv_gamma, vectors, segmentation, patches)
            beta_style = conv_of_style_map(self.conv_beta, vectors, segmentation, patches)
            gamma = gamma_alpha * gamma_style + (1 - gamma_alpha) * gamma
            beta = beta_alpha * beta_style + (1 - beta_alpha) * beta
        return normalized * (1 + gamma) + beta


class SEANResBlock(nn.Module):
    """Residual block: ACE, LeakyReLU, spectral-normed 3x3 conv, twice; learned ACE + 1x1 shortcut when
    the widths differ. Noise is drawn in upstream's order: shortcut, then ace_0, then ace_1."""

    def __init__(
        self, fin: int, fout: int, label_nc: int, style_length: int, hidden: int, use_rgb: bool, noise: bool
    ):
        super().__init__()
        self.learned_shortcut = fin != fout
        middle = min(fin, fout)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, middle, kernel_size=3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(middle, fout, kernel_size=3, padding=1))
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, kernel_size=1, bias=False))
        self.ace_0 = ACE(fin, label_nc, style_length, hidden, use_rgb, noise)
        self.ace_1 = ACE(middle, label_nc, style_length, hidden, use_rgb, noise)
        if self.learned_shortcut:
            self.ace_s = ACE(fin, label_nc, style_length, hidden, use_rgb, noise)

    def forward(self, x: Tensor, segmentation: Tensor, style_codes: Tensor) -> Tensor:
        shortcut = self.conv_s(self.ace_s(x, segmentation, style_codes)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.ace_0(x, segmentation, style_codes), LEAKY_SLOPE))
        dx = self.conv_1(F.leaky_relu(self.ace_1(dx, segmentation, style_codes), LEAKY_SLOPE))
        return shortcut + dx


class Zencoder(nn.Module):
    """Image -> style code map [N, style_length, H/2, W/2]: conv, two stride-2 convs, one transposed conv
    up, conv, tanh (InstanceNorm + LeakyReLU between). Indices as upstream's Sequential: checkpoint keys."""

    def __init__(self, style_length: int, ngf: int):
        super().__init__()
        self.model = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(3, ngf, kernel_size=3),
            nn.InstanceNorm2d(ngf),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(ngf, ngf * 2, kernel_size=3, stride=2, padding=1),
            nn.InstanceNorm2d(ngf * 2),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(ngf * 2, ngf * 4, kernel_size=3, stride=2, padding=1),
            nn.InstanceNorm2d(ngf * 4),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose2d(ngf * 4, ngf * 8, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(ngf * 8),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.ReflectionPad2d(1),
            nn.Conv2d(ngf * 8, style_length, kernel_size=3),
            nn.Tanh(),
        )

    def forward(self, image: Tensor, segmentation: Tensor) -> Tensor:
        """[N, classes, style_length]: the code map's mean over each class's pixels (zero if none)."""
        codes = self.model(image)
        masks = F.interpolate(segmentation, size=codes.shape[2:], mode="nearest")
        sums = masks.flatten(2) @ codes.flatten(2).transpose(1, 2)  # [N, classes, style]
        area = masks.sum(dim=(2, 3)).unsqueeze(-1)
        return sums / area.clamp(min=1.0)


class SEANGenerator(nn.Module):
    """SEAN SPADEGenerator. `encode_styles(image, segmentation)` -> per-class codes [N, label_nc,
    style_length]; `forward(segmentation, style_codes)` -> image [N, 3, crop, crop] in [-1, 1].
    Segmentations are one-hot [N, label_nc, H, W] float maps."""

    def __init__(
        self, label_nc: int = NUM_CLASSES, ngf: int = 64, crop_size: int = 256, style_length: int = 512,
        spade_hidden: int = 128, zencoder_ngf: int = 32, noise: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.label_nc, self.style_length = label_nc, style_length
        self.latent_size = crop_size // 2**UPSAMPLINGS
        self.Zencoder = Zencoder(style_length, zencoder_ngf)
        self.fc = nn.Conv2d(label_nc, 16 * ngf, kernel_size=3, padding=1)
        widths = {"head_0": (16, 16), "G_middle_0": (16, 16), "G_middle_1": (16, 16), "up_0": (16, 8),
                  "up_1": (8, 4), "up_2": (4, 2), "up_3": (2, 1)}  # fmt: skip
        for name, (fin, fout) in widths.items():
            use_rgb = name != "up_3"  # upstream builds up_3 without style codes
            block = SEANResBlock(fin * ngf, fout * ngf, label_nc, style_length, spade_hidden, use_rgb, noise)
            self.add_module(name, block)
        self.conv_img = nn.Conv2d(ngf, 3, kernel_size=3, padding=1)
        converge_spectral_norms(self)

    def encode_styles(self, image: Tensor, segmentation: Tensor) -> Tensor:
        return self.Zencoder(image, segmentation)

    def forward(self, segmentation: Tensor, style_codes: Tensor) -> Tensor:
        x = self.fc(F.interpolate(segmentation, size=(self.latent_size, self.latent_size), mode="nearest"))
        x = self.head_0(x, segmentation, style_codes)
        # Upsample before every block but G_middle_1 ('normal' mode).
        for name in ("G_middle_0", "G_middle_1", "up_0", "up_1", "up_2", "up_3"):
            if name != "G_middle_1":
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = getattr(self, name)(x, segmentation, style_codes)
        return torch.tanh(self.conv_img(F.leaky_relu(x, LEAKY_SLOPE)))

    def fold_spectral_norm(self) -> None:
        """Plain eval-mode convolutions instead of the spectral-normed ones (in place, idempotent)."""
        fold_spectral_norms(self)


class SEANInpainter(nn.Module):
    """HairFastGAN's SEAN step for one image per sample: forward(image [N, 3, crop, crop], labels
    [N, 1, crop, crop], target_labels [N, 1, crop, crop]) -> the image's style rendered on the target
    label map, [N, 3, crop, crop] in [-1, 1]. HairFastGAN passes `image_256`, its bicubic 4x downsample
    of the [0, 1] input, not normalised to [-1, 1]; the output goes to e4e as it is. Classes whose code
    is all zero (absent from the image) take the mean style code, as upstream's decode_sean does."""

    def __init__(self, generator: SEANGenerator, mean_style_codes: Tensor):
        super().__init__()
        expected = (generator.label_nc, generator.style_length)
        if tuple(mean_style_codes.shape) != expected:
            got = list(mean_style_codes.shape)
            raise ValueError(f"mean style codes: expected shape {list(expected)}, got {got}")
        self.generator = generator
        self.register_buffer("mean_style_codes", mean_style_codes.float().clone())

    def forward(self, image: Tensor, labels: Tensor, target_labels: Tensor) -> Tensor:
        codes = self.generator.encode_styles(image, one_hot_labels(labels, self.generator.label_nc))
        absent = (codes == 0).all(dim=-1, keepdim=True)
        codes = torch.where(absent, self.mean_style_codes, codes)
        return self.generator(one_hot_labels(target_labels, self.generator.label_nc), codes)


def find_mean_style_codes(path: Path) -> Path:
    """The folder of per-class mean codes (`<class>/ACE.npy`) for `path`: that folder itself, a HairFastGAN
    checkout holding it at MEAN_STYLE_CODES, or the checkout's `pretrained_models/` (upstream's README
    moves the weights tree into the checkout). Raises CheckpointError naming the places tried."""
    path = Path(path)
    candidates = [path, path / MEAN_STYLE_CODES, path.parent / MEAN_STYLE_CODES]
    for candidate in candidates:
        if (candidate / "0" / STYLE_CODE_FILE).is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise CheckpointError(f"SEAN mean style codes (<class>/{STYLE_CODE_FILE}) not found; looked in {tried}")


def load_mean_style_codes(folder: Path, classes: int = NUM_CLASSES, style_length: int = 512) -> Tensor:
    """[classes, style_length] float32 from `folder/<class>/ACE.npy` (each a float vector of
    style_length values). Raises CheckpointError naming a missing or malformed file."""
    rows = []
    for label in range(classes):
        file = Path(folder) / str(label) / STYLE_CODE_FILE
        if not file.is_file():
            raise CheckpointError(f"SEAN mean style code missing: {file}")
        try:
            code = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: not a readable .npy file ({exc})") from exc
        if code.shape != (style_length,) or not np.issubdtype(code.dtype, np.floating):
            raise CheckpointError(
                f"{file}: expected {style_length} float values, got {code.dtype} {list(code.shape)}"
            )
        rows.append(torch.from_numpy(code.astype(np.float32)))
    return torch.stack(rows)


def load_sean_checkpoint(path: Path, generator: SEANGenerator | None = None) -> SEANGenerator:
    """Strictly load `latest_net_G.pth` (a bare state dict, as SEAN's util.load_network reads it;
    'state_dict' wrappers and 'module.' prefixes are accepted too) into `generator` (default: the public
    256 configuration). Raises CheckpointError naming missing, unexpected or mis-shaped keys."""
    generator = generator if generator is not None else SEANGenerator()
    load_strict(generator, read_state_dict(path), f"SEAN generator checkpoint {path}")
    return generator.eval()


def load_sean_inpainter(
    checkpoint: Path, mean_codes: Path, generator: SEANGenerator | None = None
) -> SEANInpainter:
    """load_sean_checkpoint plus the mean style codes found from `mean_codes` (see find_mean_style_codes)."""
    generator = load_sean_checkpoint(checkpoint, generator)
    codes = load_mean_style_codes(
        find_mean_style_codes(mean_codes), generator.label_nc, generator.style_length
    )
    return SEANInpainter(generator, codes).eval()
