"""Our re-typing of HairFastGAN's alignment inference path, used only as a test reference.

Source read: github AIRI-Institute/HairFastGAN @ 49e98019c9243d1991c19d45764fc3340a498de2
(`models/Alignment.py`, `models/Encoders.py` RotateModel (its ModulationModule and PixelNorm are
imported from tests/hairfast_blend_reference.py, the same public classes), the vendored CtrlHair
`shape_branch/{model,solver,shape_util}.py` and `my_torchlib/module.py`, the vendored SEAN
`sean_codes/models/{pix2pix_model.py,networks/{generator,architecture,normalization}.py}`).

Re-typed in the upstream style on purpose (per-sample, per-class Python loops, masked_select /
masked_scatter_, a dict of per-class mean codes) so the tests compare our vectorised modules against it.
Changes made only so it runs here and small: CUDA placements become the input's device, synchronized
batch norm becomes nn.BatchNorm2d (identical in eval mode: F.batch_norm on the running statistics), and
sizes that upstream hard-codes (CtrlHair's 32/2048 channel widths and 7 levels, SEAN's 512 style length,
128 SPADE hidden width, 32-wide Zencoder) are arguments whose defaults are the hard-coded values.
Training-only code paths are left out.
"""

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from tests.hairfast_blend_reference import ModulationModule, PixelNorm

HAIRFAST_COMMIT = "49e98019c9243d1991c19d45764fc3340a498de2"

# --- Rotate (models/Encoders.py) ----------------------------------------------------------------------
# PixelNorm and ModulationModule are the same public classes the colour step uses: re-typed once, in
# tests/hairfast_blend_reference.py (same commit).


class RotateModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pixelnorm = PixelNorm()
        self.modulation_module_list = nn.ModuleList([ModulationModule(6, i == 4) for i in range(5)])

    def forward(self, latent_from, latent_to):
        dt_latent = self.pixelnorm(latent_from)
        for modulation_module in self.modulation_module_list:
            dt_latent = modulation_module(dt_latent, latent_to)
        output = latent_from + 0.1 * dt_latent
        return output


def rotate_stage(rotate_model, latent_w_face, latent_w_shape):
    """Alignment.shape_module's rotate step: the shape reference's W+ turned toward the face's pose."""
    rotate_to = rotate_model(latent_w_shape[:, :6], latent_w_face[:, :6])
    return torch.cat((rotate_to, latent_w_shape[:, 6:]), dim=1)


# --- CtrlHair shape branch (shape_branch/model.py, my_torchlib/module.py, shape_util.py, solver.py) ----

HAIR_IDX = 13


def generate_pos_embedding(img_size, order=10):
    coordinators = np.linspace(0, 1, img_size, endpoint=False)
    bi_coordinators = np.stack(np.meshgrid(coordinators, coordinators), 0)
    bi_coordinators = bi_coordinators[None, ...]
    nums = np.arange(0, order)
    nums = 2**nums * np.pi
    nums = nums[:, None, None, None]
    gamma1 = np.sin(nums * bi_coordinators)
    gamma2 = np.cos(nums * bi_coordinators)
    gamma = np.concatenate([gamma1, gamma2], axis=0)
    gamma = gamma.reshape([-1, img_size, img_size])
    return torch.tensor(gamma, requires_grad=False).float()


class CtrlHairLayerNorm(nn.Module):
    def __init__(self, num_features, eps=1e-5, affine=True):
        super().__init__()
        self.num_features = num_features
        self.affine = affine
        self.eps = eps
        if self.affine:
            self.gamma = nn.Parameter(torch.Tensor(num_features).uniform_())
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        shape = [-1] + [1] * (x.dim() - 1)
        if x.size(0) == 1:
            mean = x.view(-1).mean().view(*shape)
            std = x.view(-1).std().view(*shape)
        else:
            mean = x.view(x.size(0), -1).mean(1).view(*shape)
            std = x.view(x.size(0), -1).std(1).view(*shape)
        x = (x - mean) / (std + self.eps)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            x = x * self.gamma.view(*shape) + self.beta.view(*shape)
        return x


class LinearBlock(nn.Module):
    """Only the configuration the shape generator uses: no norm, no activation."""

    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim, bias=True)

    def forward(self, x):
        return self.fc(x)


class Conv2dBlock(nn.Module):
    """Zero padding, conv, optional CtrlHair LayerNorm ('ln'), optional LeakyReLU(0.2)."""

    def __init__(self, input_dim, output_dim, kernel_size, stride, padding=0, norm="none", activation="relu"):
        super().__init__()
        self.pad = nn.ZeroPad2d(padding)
        self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride, bias=True)
        self.norm = CtrlHairLayerNorm(output_dim) if norm == "ln" else None
        self.activation = nn.LeakyReLU(0.2, inplace=True) if activation == "lrelu" else None

    def forward(self, x):
        x = self.pad(x)
        x = self.conv(x)
        if self.norm:
            x = self.norm(x)
        if self.activation:
            x = self.activation(x)
        return x


class MaskEncoder(nn.Module):
    def __init__(
        self,
        input_channel,
        output_dim,
        norm,
        layer_num,
        input_size=256,
        vae_mode=False,
        pos_encoding_order=10,
        max_batch_size=1,
        hidden_in_channel=32,
        max_channel=2048,
    ):
        super().__init__()
        self.vae_mode = vae_mode
        layers = []
        in_channel = input_channel + pos_encoding_order * 4
        for cur_num in range(layer_num):
            out_channel = min(max_channel, 2**cur_num * hidden_in_channel)
            cur_conv = Conv2dBlock(
                in_channel, out_channel, kernel_size=4, stride=2, padding=1, norm=norm, activation="lrelu"
            )
            layers.append(cur_conv)
            in_channel = out_channel
        out_size = input_size // (2**layer_num)
        self.layers = nn.Sequential(*layers)
        fc_in_dim = out_size**2 * out_channel
        self.out_layer = LinearBlock(fc_in_dim, output_dim)
        if self.vae_mode:
            self.std_out_layer = LinearBlock(fc_in_dim, output_dim)
        self.input_embedding = generate_pos_embedding(img_size=input_size, order=pos_encoding_order)
        self.input_embedding = self.input_embedding.repeat((max_batch_size, 1, 1, 1))

    def forward(self, input_mask):
        batch_size = input_mask.shape[0]
        input_with_pos = torch.cat([input_mask, self.input_embedding[:batch_size]], axis=1)
        feature = self.layers(input_with_pos)
        feature = feature.flatten(1)
        out_mean = self.out_layer(feature)
        if self.vae_mode:
            out_std = self.std_out_layer(feature).abs()
            return None, out_mean, out_std  # the resampled code is training-only
        return out_mean, out_mean, None


class MaskDecoder(nn.Module):
    def __init__(
        self, input_dim, output_channel, norm, layer_num, output_size=256, base=32, max_channel=2048
    ):
        super().__init__()
        self.in_channel = min(base * 2**layer_num, max_channel)
        self.input_size = output_size // (2**layer_num)
        self.in_layer = LinearBlock(input_dim, self.in_channel * self.input_size**2)
        layers = []
        in_channel = self.in_channel
        for cur_num in range(layer_num):
            up = nn.Upsample(scale_factor=2, mode="nearest")
            out_channel = min(base * 2 ** (layer_num - 1 - cur_num), max_channel)
            cur_conv = Conv2dBlock(
                in_channel, out_channel, kernel_size=3, stride=1, padding=1, norm=norm, activation="lrelu"
            )
            layers.append(up)
            layers.append(cur_conv)
            in_channel = out_channel
        self.layers = nn.Sequential(*layers)
        self.out_layer = Conv2dBlock(
            in_channel, output_channel, kernel_size=3, stride=1, padding=1, norm="none", activation="none"
        )

    def forward(self, input_vector):
        feature = self.in_layer(input_vector)
        feature = feature.reshape(-1, self.in_channel, self.input_size, self.input_size)
        feature = self.layers(feature)
        return self.out_layer(feature)


class ShapeGenerator(nn.Module):
    """shape_branch Generator with config 054: hair_dim 16, pos_encoding_order 10, g_norm 'ln', VAE hair
    encoder, max batch max(total_batch_size 4, sample_batch_size 16)."""

    def __init__(self, hair_dim=16, face_dim=1024, layer_num=7, img_size=256, base=32, max_channel=2048):
        super().__init__()
        common = dict(input_size=img_size, pos_encoding_order=10, max_batch_size=16, hidden_in_channel=base)
        self.hair_encoder = MaskEncoder(
            1, hair_dim, norm="ln", layer_num=layer_num, vae_mode=True, max_channel=max_channel, **common
        )
        self.face_encoder = MaskEncoder(
            18, face_dim, norm="ln", layer_num=layer_num, vae_mode=False, max_channel=max_channel, **common
        )
        self.hair_decoder = MaskDecoder(
            face_dim + hair_dim, 1, "ln", layer_num, img_size, base=base, max_channel=max_channel
        )
        self.face_decoder = MaskDecoder(
            face_dim, 18, "ln", layer_num, img_size, base=base, max_channel=max_channel
        )
        self.img_size = img_size

    def forward_hair_encoder(self, hair, testing=False):
        code, mean, std = self.hair_encoder(hair)
        assert testing
        return mean

    def forward_face_encoder(self, face):
        code, _, _ = self.face_encoder(face)
        return code

    def forward_decode_by_code(self, hair_code, face_code):
        hair_logit = self.hair_decoder(torch.cat([face_code, hair_code], dim=1))
        face_logit = self.face_decoder(face_code)
        logit = torch.cat([face_logit[:, :HAIR_IDX], hair_logit, face_logit[:, HAIR_IDX:]], dim=1)
        return torch.softmax(logit, dim=1)


def mask_label_to_one_hot(img):
    img[img == 255] = 19
    bs, _, h, w = img.size()
    nc = 19
    input_label = torch.FloatTensor(bs, nc + 1, h, w).zero_().to(img.device)
    input_semantics = input_label.scatter_(1, img.long(), 1.0)
    return input_semantics[:, :-1, :, :]


def mask_one_hot_to_label(one_hot):
    mask = torch.argmax(one_hot, dim=1)
    mask[one_hot.max(dim=1)[0] == 0] = 255
    return mask


def split_hair_face(mask):
    hair = mask[:, [HAIR_IDX], :, :]
    face = torch.cat([mask[:, :HAIR_IDX, :, :], mask[:, HAIR_IDX + 1 :, :, :]], dim=1)
    return hair, face


def get_hair_face_code(mask_generator, mask):
    mask_batch = mask[None, None, :, :]
    size = mask_generator.img_size
    # torchvision's tensor resize with NEAREST is F.interpolate(mode='nearest') on a float copy.
    mask_batch = F.interpolate(mask_batch.long().float(), size=(size, size), mode="nearest").long()
    mask_one_hot = mask_label_to_one_hot(mask_batch)
    hair, face = split_hair_face(mask_one_hot)
    hair_code = mask_generator.forward_hair_encoder(hair, testing=True)
    face_code = mask_generator.forward_face_encoder(face)
    return face_code, hair_code


def get_new_shape(mask_generator, face_code, new_hair_code):
    out_mask = mask_generator.forward_decode_by_code(new_hair_code, face_code)
    return mask_one_hot_to_label(out_mask)[0]


def shape_stage(mask_generator, face_mask, shape_mask):
    """Alignment.shape_module's shape-adaptor step for one pair of [1, 1, H, W] label maps."""
    face_1, hair_1 = get_hair_face_code(mask_generator, face_mask[0, 0, ...])
    face_2, hair_2 = get_hair_face_code(mask_generator, shape_mask[0, 0, ...])
    return get_new_shape(mask_generator, face_1, hair_2)[None, None]


# --- SEAN (sean_codes/models/networks/{normalization,architecture,generator}.py, pix2pix_model.py) ----


class SPADE(nn.Module):
    def __init__(self, config_text, norm_nc, label_nc, nhidden=128):
        super().__init__()
        parsed = re.search(r"spade(\D+)(\d)x\d", config_text)
        ks = int(parsed.group(2))
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        pw = ks // 2
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, kernel_size=ks, padding=pw), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, kernel_size=ks, padding=pw)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, kernel_size=ks, padding=pw)

    def forward(self, segmap):
        actv = self.mlp_shared(segmap)
        return self.mlp_gamma(actv), self.mlp_beta(actv)


class ACE(nn.Module):
    def __init__(self, norm_nc, label_nc, status, use_rgb, style_length=512, nhidden=128):
        super().__init__()
        self.status = status
        self.Spade = SPADE("spadesyncbatch3x3", norm_nc, label_nc, nhidden)
        self.use_rgb = use_rgb
        self.style_length = style_length
        self.label_nc = label_nc
        self.blending_gamma = nn.Parameter(torch.zeros(1), requires_grad=True)
        self.blending_beta = nn.Parameter(torch.zeros(1), requires_grad=True)
        self.noise_var = nn.Parameter(torch.zeros(norm_nc), requires_grad=True)
        ks = 3
        pw = ks // 2
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        if self.use_rgb:
            for j in range(label_nc):
                setattr(self, f"fc_mu{j}", nn.Linear(style_length, style_length))
            self.conv_gamma = nn.Conv2d(self.style_length, norm_nc, kernel_size=ks, padding=pw)
            self.conv_beta = nn.Conv2d(self.style_length, norm_nc, kernel_size=ks, padding=pw)

    def forward(self, x, segmap, style_codes=None, obj_dic=None):
        added_noise = (
            torch.randn(x.shape[0], x.shape[3], x.shape[2], 1, device=x.device) * self.noise_var
        ).transpose(1, 3)
        normalized = self.param_free_norm(x + added_noise)
        segmap = F.interpolate(segmap, size=x.size()[2:], mode="nearest")
        if self.use_rgb:
            [b_size, f_size, h_size, w_size] = normalized.shape
            middle_avg = torch.zeros((b_size, self.style_length, h_size, w_size), device=normalized.device)
            if self.status == "UI_mode":
                for i in range(1):
                    for j in range(segmap.shape[1]):
                        component_mask_area = torch.sum(segmap.bool()[i, j])
                        if component_mask_area > 0:
                            style_code_tmp = obj_dic[str(j)]["ACE"]
                            middle_mu = F.relu(self.__getattr__("fc_mu" + str(j))(style_code_tmp))
                            component_mu = middle_mu.reshape(self.style_length, 1).expand(
                                self.style_length, component_mask_area
                            )
                            middle_avg[i].masked_scatter_(segmap.bool()[i, j], component_mu)
            else:
                for i in range(b_size):
                    for j in range(segmap.shape[1]):
                        component_mask_area = torch.sum(segmap.bool()[i, j])
                        if component_mask_area > 0:
                            middle_mu = F.relu(self.__getattr__("fc_mu" + str(j))(style_codes[i][j]))
                            component_mu = middle_mu.reshape(self.style_length, 1).expand(
                                self.style_length, component_mask_area
                            )
                            middle_avg[i].masked_scatter_(segmap.bool()[i, j], component_mu)
            gamma_avg = self.conv_gamma(middle_avg)
            beta_avg = self.conv_beta(middle_avg)
            gamma_spade, beta_spade = self.Spade(segmap)
            gamma_alpha = torch.sigmoid(self.blending_gamma)
            beta_alpha = torch.sigmoid(self.blending_beta)
            gamma_final = gamma_alpha * gamma_avg + (1 - gamma_alpha) * gamma_spade
            beta_final = beta_alpha * beta_avg + (1 - beta_alpha) * beta_spade
            out = normalized * (1 + gamma_final) + beta_final
        else:
            gamma_spade, beta_spade = self.Spade(segmap)
            out = normalized * (1 + gamma_spade) + beta_spade
        return out


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin, fout, label_nc, status, use_rgb=True, style_length=512, nhidden=128):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, fmiddle, kernel_size=3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(fmiddle, fout, kernel_size=3, padding=1))
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, kernel_size=1, bias=False))
        self.ace_0 = ACE(fin, label_nc, status, use_rgb, style_length, nhidden)
        self.ace_1 = ACE(fmiddle, label_nc, status, use_rgb, style_length, nhidden)
        if self.learned_shortcut:
            self.ace_s = ACE(fin, label_nc, status, use_rgb, style_length, nhidden)

    def forward(self, x, seg, style_codes, obj_dic=None):
        x_s = self.shortcut(x, seg, style_codes, obj_dic)
        dx = self.ace_0(x, seg, style_codes, obj_dic)
        dx = self.conv_0(self.actvn(dx))
        dx = self.ace_1(dx, seg, style_codes, obj_dic)
        dx = self.conv_1(self.actvn(dx))
        return x_s + dx

    def shortcut(self, x, seg, style_codes, obj_dic):
        if self.learned_shortcut:
            return self.conv_s(self.ace_s(x, seg, style_codes, obj_dic))
        return x

    def actvn(self, x):
        return F.leaky_relu(x, 2e-1)


class Zencoder(nn.Module):
    def __init__(self, input_nc, output_nc, ngf=32, n_downsampling=2, norm_layer=nn.InstanceNorm2d):
        super().__init__()
        self.output_nc = output_nc
        model = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(input_nc, ngf, kernel_size=3, padding=0),
            norm_layer(ngf),
            nn.LeakyReLU(0.2, False),
        ]
        for i in range(n_downsampling):
            mult = 2**i
            model += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1),
                norm_layer(ngf * mult * 2),
                nn.LeakyReLU(0.2, False),
            ]
        for i in range(1):
            mult = 2 ** (n_downsampling - i)
            model += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, output_padding=1
                ),
                norm_layer(int(ngf * mult / 2)),
                nn.LeakyReLU(0.2, False),
            ]
        # upstream: nn.Conv2d(256, output_nc, ...), 256 being ngf * 8 for its ngf of 32
        model += [nn.ReflectionPad2d(1), nn.Conv2d(ngf * 8, output_nc, kernel_size=3, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, input, segmap):
        codes = self.model(input)
        segmap = F.interpolate(segmap, size=codes.size()[2:], mode="nearest")
        b_size = codes.shape[0]
        f_size = codes.shape[1]
        s_size = segmap.shape[1]
        codes_vector = torch.zeros((b_size, s_size, f_size), dtype=codes.dtype, device=codes.device)
        for i in range(b_size):
            for j in range(s_size):
                component_mask_area = torch.sum(segmap.bool()[i, j])
                if component_mask_area > 0:
                    selected = codes[i].masked_select(segmap.bool()[i, j])
                    codes_component_feature = selected.reshape(f_size, component_mask_area).mean(1)
                    codes_vector[i][j] = codes_component_feature
        return codes_vector


class SPADEGenerator(nn.Module):
    """SEAN_OPT of pix2pix_model.py: netG 'spade', ngf 64, crop 256, 19 labels, 'normal' upsampling."""

    def __init__(self, label_nc=19, ngf=64, crop_size=256, style_length=512, nhidden=128, zencoder_ngf=32):
        super().__init__()
        nf = ngf
        self.sw = crop_size // 2**5
        self.sh = self.sw
        self.Zencoder = Zencoder(3, style_length, ngf=zencoder_ngf)
        self.fc = nn.Conv2d(label_nc, 16 * nf, 3, padding=1)
        opts = dict(label_nc=label_nc, status="test", style_length=style_length, nhidden=nhidden)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, **opts)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, **opts)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, **opts)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, **opts)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, **opts)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, **opts)
        self.up_3 = SPADEResnetBlock(2 * nf, 1 * nf, use_rgb=False, **opts)
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, input, rgb_img, obj_dic=None):
        seg = input
        x = F.interpolate(seg, size=(self.sh, self.sw))
        x = self.fc(x)
        style_codes = None if rgb_img is None else self.Zencoder(input=rgb_img, segmap=seg)
        x = self.head_0(x, seg, style_codes, obj_dic=obj_dic)
        x = self.up(x)
        x = self.G_middle_0(x, seg, style_codes, obj_dic=obj_dic)
        x = self.G_middle_1(x, seg, style_codes, obj_dic=obj_dic)
        x = self.up(x)
        x = self.up_0(x, seg, style_codes, obj_dic=obj_dic)
        x = self.up(x)
        x = self.up_1(x, seg, style_codes, obj_dic=obj_dic)
        x = self.up(x)
        x = self.up_2(x, seg, style_codes, obj_dic=obj_dic)
        x = self.up(x)
        x = self.up_3(x, seg, style_codes, obj_dic=obj_dic)
        x = self.conv_img(F.leaky_relu(x, 2e-1))
        return torch.tanh(x)


def change_status(model, new_status):
    for m in model.modules():
        if hasattr(m, "status"):
            m.status = new_status


def one_hot_labels(labels, label_nc):
    """Pix2PixModel.preprocess_input: scatter the [B, 1, H, W] label map into label_nc channels."""
    labels = labels.long()
    bs, _, h, w = labels.size()
    return torch.zeros(bs, label_nc, h, w).scatter_(1, labels, 1.0)


def encode_sean(netG, images, labels, label_nc=19):
    change_status(netG, "test")
    return netG.Zencoder(input=images, segmap=one_hot_labels(labels, label_nc))


def decode_sean(netG, image_code, target_mask, mean_codes, label_nc=19):
    """decode_sean with load_average_feature's dict: the `median` folder's per-class ACE codes, each
    replaced by the image's own code when that code is not all zero."""
    obj_dic = {str(i): {"ACE": mean_codes[i]} for i in range(label_nc)}
    for idx in range(label_nc):
        cur_code = image_code[0, idx]
        if not torch.all(cur_code == 0):
            obj_dic[str(idx)]["ACE"] = cur_code
    temp_face_image = torch.zeros((0, 3, target_mask.shape[2], target_mask.shape[3]))
    change_status(netG, "UI_mode")
    return netG(one_hot_labels(target_mask, label_nc), temp_face_image.clone(), obj_dic=obj_dic)[0]


def inpaint_stage(netG, images, labels, target_mask, mean_codes, label_nc=19):
    """Alignment.align_images' SEAN step: both images' codes, each decoded on the target mask."""
    codes = encode_sean(netG, images, labels, label_nc)
    return [decode_sean(netG, code.unsqueeze(0), target_mask, mean_codes, label_nc) for code in codes]
