"""Test reference: our re-typing of HairFastGAN's public hair transfer, `HairFast.swap` on aligned images.

Source: github AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2 (MIT):
`hair_swap.py` (HairFast.__swap_from_tensors, argument defaults), `utils/image_utils.py` (equal_replacer,
DilateErosion), `utils/bicubic.py` (BicubicDownSample), `models/Net.py` (get_segmentation),
`models/CtrlHair/external_code/face_parsing/my_parsing_util.py` (swap_parsing_label_to_celeba_mask),
`models/CtrlHair/global_value_utils.py` (PARSING_LABEL_LIST), `models/Embedding.py`, `models/Alignment.py`,
`models/Blending.py`.

This is the glue between the networks, written as the public code is structured (dicts of embeddings per
image name, `is` tests after equal_replacer, batch-1 calls). The networks themselves are passed in: each
has its own test against a re-typing of its public code (tests/test_hairfast_*.py); the generator is
driven through tests/hairfast_reference.py's re-typing of the public Generator.forward with the
generator's fixed noise (the public code draws fresh noise per call). Departures, for tests only: the
1024 / 512 px downsampling factors follow the portrait size (factor = size / 256, 2), so tests run at
256 px; SEAN is called as one inpainting callable (encode_sean + decode_sean per image).
"""

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests import hairfast_blend_reference
from tests.hairfast_reference import generator_forward

MIXING = 0.95  # hair_swap.py --mixing
SMOOTH = 5  # hair_swap.py --smooth
FACE_PARSING_LABELS = {
    0: "background", 1: "skin_other", 2: "l_brow", 3: "r_brow", 4: "l_eye", 5: "r_eye", 6: "eye_g",
    7: "l_ear",
    8: "r_ear", 9: "ear_r", 10: "nose", 11: "mouth", 12: "u_lip", 13: "l_lip", 14: "neck", 15: "neck_l",
    16: "cloth", 17: "hair", 18: "hat",
}  # fmt: skip
PARSING_LABEL_LIST = [
    "background", "skin_other", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
]  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Networks:
    """The networks HairFast uses, as callables with the public call signatures."""

    e4e: nn.Module  # image_norm_256 -> W+ (latent_avg added, as get_latents)
    fs_encoder: nn.Module  # normalized image -> (S, content map): FSencoder trainer.test
    generator: nn.Module  # driven by generator_forward
    bise_net: nn.Module  # ImageNet-normalized image -> logits (the main output)
    rotate_model: nn.Module  # (W_shape[:, :6], W_face[:, :6]) -> rotated entries
    mask_generator: nn.Module  # (face mask, shape mask) -> target mask (get_hair_face_code + get_new_shape)
    sean: nn.Module  # (image_256, labels, target_mask) -> inpainted image (encode_sean + decode_sean)
    clip: nn.Module  # ClipBlendingModel.get_image_embed
    blending_modulations: nn.Module  # ClipBlendingModel's modulation part on the two embeddings
    post_process: nn.Module  # PostProcessModel


class BicubicDownSample:
    def __init__(self, factor: int):
        self.factor = factor
        size = factor * 4
        a = -0.5

        def bicubic_kernel(x: Tensor) -> float:
            abs_x = torch.abs(x)
            if abs_x <= 1.0:
                return float((a + 2.0) * torch.pow(abs_x, 3.0) - (a + 3.0) * torch.pow(abs_x, 2.0) + 1)
            if 1.0 < abs_x < 2.0:
                return float(
                    a * torch.pow(abs_x, 3) - 5.0 * a * torch.pow(abs_x, 2.0) + 8.0 * a * abs_x - 4.0 * a
                )
            return 0.0

        k = torch.tensor(
            [bicubic_kernel((i - torch.floor(torch.tensor(size / 2)) + 0.5) / factor) for i in range(size)],
            dtype=torch.float32,
        )
        k = k / torch.sum(k)
        self.k1 = torch.cat([torch.reshape(k, (1, 1, size, 1))] * 3, dim=0)
        self.k2 = torch.cat([torch.reshape(k, (1, 1, 1, size))] * 3, dim=0)

    def __call__(self, x: Tensor) -> Tensor:
        filter_size, stride = self.factor * 4, self.factor
        pad_along = max(filter_size - stride, 0)
        pad_top = pad_along // 2
        pad_bottom = pad_along - pad_top
        x = F.pad(x, (0, 0, pad_top, pad_bottom), "reflect")
        x = F.conv2d(input=x, weight=self.k1, stride=(stride, 1), groups=3)
        x = F.pad(x, (pad_top, pad_bottom, 0, 0), "reflect")
        return F.conv2d(input=x, weight=self.k2, stride=(1, stride), groups=3)


class DilateErosion(hairfast_blend_reference.DilateErosion):
    """utils/image_utils.py's DilateErosion (mask() re-typed in tests/hairfast_blend_reference.py), with
    hair_from_mask as upstream: the label map resized to 256 x 256."""

    def hair_from_mask(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = torch.where(mask == 13, torch.ones_like(mask), torch.zeros_like(mask))
        mask = F.interpolate(mask.float(), size=(256, 256), mode="nearest")
        return self.mask(mask)


def equal_replacer(images: list[Tensor]) -> list[Tensor]:
    for i in range(len(images)):
        if images[i].dtype is torch.uint8:
            images[i] = images[i] / 255
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            if torch.allclose(images[i], images[j]):
                images[j] = images[i]
    return images


class HairFast:
    """HairFast.__swap_from_tensors with Embedding, Alignment and Blending, batch 1."""

    def __init__(self, networks: Networks, image_size: int):
        self.n = networks
        self.noise = [
            getattr(networks.generator.noises, f"noise_{i}") for i in range(networks.generator.num_layers)
        ]
        self.downsample_512 = BicubicDownSample(factor=2)
        self.downsample_256 = BicubicDownSample(factor=image_size // 256)
        self.dilate_erosion = DilateErosion(SMOOTH)
        self.intermediates: dict[str, Tensor] = {}  # of the last swap, for tests: S_blend, F_align, S/F_final

    # --- shared helpers ---------------------------------------------------------------------------
    def generator(self, latent: Tensor, start_layer: int = 0, end_layer: int = 8, layer_in=None):
        return generator_forward(self.n.generator, latent, self.noise, layer_in, start_layer, end_layer)

    @staticmethod
    def normalize(x: Tensor) -> Tensor:  # T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return (x - 0.5) / 0.5

    @staticmethod
    def to_bisenet(x: Tensor) -> Tensor:
        mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
        return (x - mean) / std

    def get_segmentation(self, img_rgb: Tensor) -> Tensor:
        out = self.n.bise_net(img_rgb)
        parsing = out.squeeze(0).argmax(0)
        celeba_parsing = torch.zeros_like(parsing)
        label_lists = list(FACE_PARSING_LABELS.values())
        for label_idx, label_name in enumerate(PARSING_LABEL_LIST):
            celeba_parsing[label_lists.index(label_name) == parsing] = label_idx
        mask_img = celeba_parsing.long()[None, None, ...]
        # torchvision's resize(NEAREST) of a tensor
        return F.interpolate(mask_img.float(), size=(256, 256), mode="nearest").long()

    def get_e4e_embed(self, images: list[Tensor]) -> dict[str, Tensor]:
        image = torch.cat(images)
        latent_W = self.n.e4e(image)
        latent_F, _ = self.generator(latent_W, start_layer=0, end_layer=3)
        return {"F": latent_F, "W": latent_W}

    # --- Embedding.embedding_images ----------------------------------------------------------------
    def embedding_images(self, images_to_name: dict) -> dict:
        name_to_embed: dict = defaultdict(dict)
        for image, names in images_to_name.items():  # batch_size 3 groups them; every step is per sample
            image = image.unsqueeze(0)
            im_512 = self.downsample_512(image)
            im_256 = self.downsample_256(image)
            im_256_norm = self.normalize(im_256)
            latent_W = self.n.e4e(im_256_norm)
            latent_S, latent = self.n.fs_encoder(self.normalize(image))
            latent_F, _ = self.generator(latent_S, start_layer=3, end_layer=3, layer_in=latent)
            masks = torch.cat([self.get_segmentation(img.unsqueeze(0)) for img in self.to_bisenet(im_512)])
            if len(images_to_name) > 1:
                hair_mask = torch.where(masks == 13, torch.ones_like(masks), torch.zeros_like(masks))
                hair_mask = F.interpolate(hair_mask.float(), size=(32, 32), mode="bicubic")
                latent_F_from_W = self.generator(latent_W, start_layer=0, end_layer=3)[0]
                latent_F = latent_F + MIXING * hair_mask * (latent_F_from_W - latent_F)
            for name in names:
                name_to_embed[name]["W"] = latent_W
                name_to_embed[name]["F"] = latent_F
                name_to_embed[name]["S"] = latent_S
                name_to_embed[name]["mask"] = masks
                name_to_embed[name]["image_256"] = im_256
                name_to_embed[name]["image_norm_256"] = im_256_norm
        return name_to_embed

    # --- Alignment ---------------------------------------------------------------------------------
    def shape_module(self, im_name1: str, im_name2: str, name_to_embed: dict, only_target: bool = True):
        img1_in = name_to_embed[im_name1]["image_256"]
        img2_in = name_to_embed[im_name2]["image_256"]
        latent_W_1 = name_to_embed[im_name1]["W"]
        latent_W_2 = name_to_embed[im_name2]["W"]
        inp_mask1 = name_to_embed[im_name1]["mask"]
        inp_mask2 = name_to_embed[im_name2]["mask"]
        if img1_in is not img2_in:
            rotate_to = self.n.rotate_model(latent_W_2[:, :6], latent_W_1[:, :6])
            rotate_to = torch.cat((rotate_to, latent_W_2[:, 6:]), dim=1)
            I_rot, _ = self.generator(rotate_to)
            I_rot_to_seg = ((I_rot + 1) / 2).clip(0, 1)
            I_rot_to_seg = self.to_bisenet(I_rot_to_seg)
            rot_mask = self.get_segmentation(I_rot_to_seg)
            target_mask = self.n.mask_generator(inp_mask1, rot_mask)
        else:
            target_mask = inp_mask1
        hair_mask_target = torch.where(
            target_mask == 13, torch.ones_like(target_mask), torch.zeros_like(target_mask)
        )
        if only_target:
            return {"HM_X": hair_mask_target}
        hair_mask1 = torch.where(inp_mask1 == 13, torch.ones_like(inp_mask1), torch.zeros_like(inp_mask1))
        hair_mask2 = torch.where(inp_mask2 == 13, torch.ones_like(inp_mask2), torch.zeros_like(inp_mask2))
        return inp_mask1, hair_mask1, inp_mask2, hair_mask2, target_mask, hair_mask_target

    def align_images(self, im_name1: str, im_name2: str, name_to_embed: dict) -> dict:
        img1_in = name_to_embed[im_name1]["image_256"]
        img2_in = name_to_embed[im_name2]["image_256"]
        latent_F_1 = name_to_embed[im_name1]["F"]
        latent_F_2 = name_to_embed[im_name2]["F"]
        if img1_in is img2_in:
            hair_mask_target = self.shape_module(im_name1, im_name2, name_to_embed, only_target=True)["HM_X"]
            return {"latent_F_align": latent_F_1, "HM_X": hair_mask_target}
        inp_mask1, hair_mask1, inp_mask2, hair_mask2, target_mask, hair_mask_target = self.shape_module(
            im_name1, im_name2, name_to_embed, only_target=False
        )
        gen1_sean = self.n.sean(img1_in, inp_mask1, target_mask)
        gen2_sean = self.n.sean(img2_in, inp_mask2, target_mask)
        enc_imgs = self.get_e4e_embed([gen1_sean, gen2_sean])
        intermediate_align = enc_imgs["F"][0].unsqueeze(0)
        latent_F_out_new = enc_imgs["F"][1].unsqueeze(0)
        masks = [
            1 - (1 - hair_mask1) * (1 - hair_mask_target),
            hair_mask_target,
            hair_mask2 * hair_mask_target,
        ]
        masks = torch.cat(masks, dim=0)
        dilate, erosion = self.dilate_erosion.mask(masks)
        free_mask = torch.stack([dilate[0], erosion[1], erosion[2]], dim=0)
        free_mask_down_32 = F.interpolate(free_mask.float(), size=(32, 32), mode="bicubic")
        interpolation_low = 1 - free_mask_down_32
        latent_F_align = intermediate_align + interpolation_low[0] * (latent_F_1 - intermediate_align)
        latent_F_align = latent_F_out_new + interpolation_low[1] * (latent_F_align - latent_F_out_new)
        latent_F_align = latent_F_2 + interpolation_low[2] * (latent_F_align - latent_F_2)
        return {"latent_F_align": latent_F_align, "HM_X": hair_mask_target}

    # --- Blending.blend_images ---------------------------------------------------------------------
    def blending_encoder(self, latent_face, latent_color, target_face, hair_color) -> Tensor:
        return self.n.blending_modulations(
            latent_face, latent_color, self.n.clip(target_face), self.n.clip(hair_color)
        )

    def blend_images(self, align_shape: dict, align_color: dict, name_to_embed: dict) -> Tensor:
        I_1 = name_to_embed["face"]["image_norm_256"]
        I_2 = name_to_embed["shape"]["image_norm_256"]
        I_3 = name_to_embed["color"]["image_norm_256"]
        mask_de = self.dilate_erosion.hair_from_mask(
            torch.cat([name_to_embed[x]["mask"] for x in ["face", "color"]])
        )
        HM_1D = mask_de[0][0].unsqueeze(0)
        HM_3D, HM_3E = mask_de[0][1].unsqueeze(0), mask_de[1][1].unsqueeze(0)
        latent_S_1, latent_F_align = name_to_embed["face"]["S"], align_shape["latent_F_align"]
        HM_X = align_color["HM_X"]
        latent_S_3 = name_to_embed["color"]["S"]
        HM_XD, _ = self.dilate_erosion.mask(HM_X)
        target_mask = (1 - HM_1D) * (1 - HM_3D) * (1 - HM_XD)
        if I_1 is not I_3 or I_1 is not I_2:
            S_blend_6_18 = self.blending_encoder(
                latent_S_1[:, 6:], latent_S_3[:, 6:], I_1 * target_mask, I_3 * HM_3E
            )
            S_blend = torch.cat((latent_S_1[:, :6], S_blend_6_18), dim=1)
        else:
            S_blend = latent_S_1
        I_blend, _ = self.generator(S_blend, start_layer=4, end_layer=8, layer_in=latent_F_align)
        I_blend_256 = self.downsample_256(I_blend)
        S_final, F_final = self.n.post_process(I_1, I_blend_256)
        self.intermediates = {
            "S_blend": S_blend,
            "F_align": latent_F_align,
            "S_final": S_final,
            "F_final": F_final,
        }
        I_final, _ = self.generator(S_final, start_layer=5, end_layer=8, layer_in=F_final)
        return ((I_final[0] + 1) / 2).clip(0, 1)

    # --- hair_swap.py ------------------------------------------------------------------------------
    @torch.no_grad()
    def swap(self, face: Tensor, shape: Tensor, color: Tensor) -> Tensor:
        """uint8 [3, H, W] images -> the final image [3, H, W] in [0, 1]."""
        face, shape, color = equal_replacer([face, shape, color])
        images_to_name: dict = defaultdict(list)
        for image, name in zip((face, shape, color), ("face", "shape", "color"), strict=True):
            images_to_name[image].append(name)
        name_to_embed = self.embedding_images(images_to_name)
        align_shape = self.align_images("face", "shape", name_to_embed)
        if shape is not color:
            align_color = self.shape_module("face", "color", name_to_embed)
        else:
            align_color = align_shape
        return self.blend_images(align_shape, align_color, name_to_embed)
