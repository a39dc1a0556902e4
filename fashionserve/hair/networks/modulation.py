"""HairFastGAN's latent modulation block (`models/Encoders.py` ModulationModule, AIRI-Institute/HairFastGAN
@ 49e98019c9243d1991c19d45764fc3340a498de2), used by its post-process, blending and rotate networks."""

from torch import Tensor, nn

NEGATIVE_SLOPE = 0.01  # torch's LeakyReLU default, as the public module uses


class ModulationModule(nn.Module):
    """x [N, n_layers, dim] -> LayerNorm over (n_layers, dim) jointly (no affine) of fc(x), scaled by
    1 + gamma(embedding) and shifted by beta(embedding); leaky ReLU unless `last`. gamma and beta are
    Linear(inp, middle), LayerNorm(middle), leaky ReLU, Linear(middle, dim) of the embedding
    [N, n_layers, inp]."""

    def __init__(self, n_layers: int, last: bool = False, inp: int = 512, middle: int = 512, dim: int = 512):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm([n_layers, dim], elementwise_affine=False)
        self.gamma_function = self._affine_branch(inp, middle, dim)
        self.beta_function = self._affine_branch(inp, middle, dim)
        self.last = last

    @staticmethod
    def _affine_branch(inp: int, middle: int, dim: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(inp, middle),
            nn.LayerNorm([middle]),
            nn.LeakyReLU(NEGATIVE_SLOPE),
            nn.Linear(middle, dim),
        )

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        out = self.norm(self.fc(x)) * (1 + self.gamma_function(embedding)) + self.beta_function(embedding)
        return out if self.last else nn.functional.leaky_relu(out, NEGATIVE_SLOPE)
