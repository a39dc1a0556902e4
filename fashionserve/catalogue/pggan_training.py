"""Progressive-growing GAN training (Karras et al., ICLR 2018) of the zoo-layout generator on
Fashion-MNIST, small enough for one CPU thread.

What the paper prescribes and this does: growing 4x4 -> 8x8 -> ... one resolution at a time, each new
resolution first faded in (its layers blended with the upsampled previous output while `alpha` goes
from 1 to 0, zoo convention) and then trained alone; real images downsampled to the current resolution
and, during a fade, blended the same way; equalized learning rate and pixel norm (in the networks,
`pggan.py`); minibatch stddev in the critic; WGAN-GP loss (lambda 10) with the epsilon-drift term
0.001 * D(real)^2; one critic step per generator step; Adam lr 0.001, betas (0, 0.99), optimizer state
reset at every growth (as the zoo does); an exponential moving average of the generator (decay 0.999),
which is the generator that is exported and served (`avgG`).

Fashion-MNIST's 28x28 grayscale images are padded with black to 32x32 and scaled to [-1, 1]; the
generator has one output channel (served as gray RGB by `PGGANPostprocess`). Minibatches are drawn
with replacement from one seeded torch generator, which also draws latents and the gradient-penalty
mix, so training resumed from a checkpoint continues exactly as an uninterrupted run (on one thread).

Files in the output folder: `training.pt` (everything needed to resume; also a zoo-layout checkpoint of
the current resolution), `history.json` (losses over time), `samples_<R>x<R>.png` (a contact sheet of
the moving-average generator at the end of each resolution) and, when training is complete,
`fashion_generator.pt` (config, avgG, netG and netD only: the file to ship and export).
"""

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from fashionserve.catalogue.networks.pggan import PGGANConfig, PGGANDiscriminator, PGGANGenerator
from fashionserve.checkpoints import CheckpointError, load_strict, read_checkpoint
from fashionserve.sheets import contact_sheet

TRAINING_FILE = "training.pt"
RELEASE_FILE = "fashion_generator.pt"
HISTORY_FILE = "history.json"
PADDED_SIZE = 32  # Fashion-MNIST's 28x28 padded by 2 black pixels on every side
SAMPLE_COUNT = 64  # images on each contact sheet (8 x 8)
SAMPLE_SEED = 1234  # the contact sheets' fixed latents
SHEET_SCALE = 2  # contact sheet pixels per image pixel at the final resolution


@dataclass(frozen=True)
class PGGANTrainOptions:
    depths: tuple[int, ...] = (128, 64, 32, 16)  # channels at 4x4, 8x8, 16x16, 32x32
    latent_dim: int = 128
    batch_sizes: tuple[int, ...] = (128, 64, 32, 32)  # per resolution: larger where steps are cheap
    fade_images: int = 30_000  # real images shown while a new resolution fades in
    stage_images: int = 40_000  # real images shown at each resolution once faded in
    learning_rate: float = 0.001
    beta1: float = 0.0
    beta2: float = 0.99
    lambda_gp: float = 10.0
    epsilon_drift: float = 0.001
    ema_decay: float = 0.995  # the paper 0.999; shorter here: a phase is only a few hundred steps
    minibatch_group: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.depths) < 1 or min(self.depths) < 1:
            raise ValueError("depths: one positive channel count per resolution from 4x4 up")
        if len(self.batch_sizes) != len(self.depths) or min(self.batch_sizes) < 2:
            raise ValueError("batch sizes: one per resolution, each at least 2")
        if self.latent_dim < 1 or self.stage_images < 1 or self.fade_images < 0:
            raise ValueError("latent size and stage images must be positive, fade images not negative")

    @property
    def resolution(self) -> int:
        return 4 * 2 ** (len(self.depths) - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "depths": list(self.depths), "batch_sizes": list(self.batch_sizes)}

    @classmethod
    def from_dict(cls, values: dict) -> "PGGANTrainOptions":
        return cls(
            **{**values, "depths": tuple(values["depths"]), "batch_sizes": tuple(values["batch_sizes"])}
        )


@dataclass(frozen=True)
class Phase:
    stage: int  # resolution index: 0 is 4x4
    fading: bool
    start: int  # images shown before the phase begins
    images: int

    @property
    def resolution(self) -> int:
        return 4 * 2**self.stage

    @property
    def end(self) -> int:
        return self.start + self.images


def schedule(options: PGGANTrainOptions, kept: tuple[Phase, ...] = ()) -> list[Phase]:
    """The phases in order: 4x4 stable, then per added resolution a fade-in and a stable phase. The
    `kept` phases (the first ones, already begun) stay as they are; the rest get the options' counts."""
    phases = list(kept)
    start = kept[-1].end if kept else 0
    for stage in range(len(options.depths)):
        for fading, images in ((True, options.fade_images), (False, options.stage_images)):
            skip = fading and (stage == 0 or images == 0)
            if skip or any(phase.stage == stage and phase.fading == fading for phase in kept):
                continue
            phases.append(Phase(stage, fading, start, images))
            start += images
    return phases


def phase_at(phases: list[Phase], images: int) -> Phase | None:
    """The phase that image count `images` falls in; None when training is complete."""
    return next((phase for phase in phases if phase.start <= images < phase.end), None)


def fade_alpha(phase: Phase, images: int) -> float:
    """Weight of the old (upsampled) path: 1 -> 0 linearly over a fade-in, 0 otherwise."""
    return 1.0 - (images - phase.start) / phase.images if phase.fading else 0.0


def network_config(options: PGGANTrainOptions, stage: int, alpha: float = 0.0) -> PGGANConfig:
    """The generator/critic architecture at resolution index `stage` (one gray channel)."""
    return PGGANConfig(
        latent_dim=options.latent_dim,
        depth_scale0=options.depths[0],
        depth_other_scales=tuple(options.depths[1 : stage + 1]),
        dim_output=1,
        alpha=alpha,
    )


def zoo_config(config: PGGANConfig, options: PGGANTrainOptions) -> dict:
    """The checkpoint's `config`, with the zoo's attribute names (what `PGGANConfig.from_zoo` reads)."""
    return {
        "latentVectorDim": config.latent_dim,
        "depthScale0": config.depth_scale0,
        "depthOtherScales": list(config.depth_other_scales),
        "dimOutput": config.dim_output,
        "alpha": config.alpha,
        "leakyReluLeak": config.leaky_relu_leak,
        "perChannelNormalization": config.pixel_norm,
        "equalizedlR": config.equalized_lr,
        "miniBatchStdDev": True,
        "lossCriterion": "WGANGP",
        "lambdaGP": options.lambda_gp,
        "epsilonD": options.epsilon_drift,
        "learningRate": options.learning_rate,
        "initBiasToZero": True,
    }


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> [N, 32, 32], the garment centred on black (what the generator learns)."""
    margin = (PADDED_SIZE - images.shape[1]) // 2
    return np.pad(images, ((0, 0), (margin, margin), (margin, margin)))


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] float [N, 1, R, R] -> uint8 [N, R, R], as the served postprocess rounds."""
    return (images[:, 0] * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def grown(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` (one resolution more) with every weight `old` has copied in; only layers of the added
    resolution keep their fresh initialization."""
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    if unexpected:
        raise CheckpointError(f"growing the network left weights unused: {', '.join(unexpected)}")
    fresh_prefixes = (f"scaleLayers.{len(new.scaleLayers) - 1}.", "toRGBLayers.", "fromRGBLayers.")
    if any(not key.startswith(fresh_prefixes) for key in missing):
        raise CheckpointError(f"growing the network lost weights: {', '.join(missing)}")
    return new


def _adam(network: nn.Module, options: PGGANTrainOptions) -> torch.optim.Adam:
    return torch.optim.Adam(
        network.parameters(), lr=options.learning_rate, betas=(options.beta1, options.beta2)
    )


class PGGANTraining:
    """Networks, optimizers, the random generator and the image count of one training run."""

    def __init__(self, options: PGGANTrainOptions, stage: int = 0):
        self.options = options
        self.phases = schedule(options)
        self.stage = stage
        self.images = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.average_steps = 0  # generator steps since the average was restarted (at every growth)
        self.rng = torch.Generator().manual_seed(options.seed)
        with torch.random.fork_rng(devices=[]):  # the networks' initialization
            torch.manual_seed(options.seed)
            self.generator = PGGANGenerator(network_config(options, stage))
            self.discriminator = PGGANDiscriminator(network_config(options, stage), options.minibatch_group)
        self.average = copy.deepcopy(self.generator)
        self.optimizer_g = _adam(self.generator, options)
        self.optimizer_d = _adam(self.discriminator, options)

    def reschedule(self, fade_images: int | None, stage_images: int | None) -> None:
        """Give the current and later phases new image counts (None: keep); finished phases stay. A
        current phase that has already shown more than its new count ends now."""
        options = replace(
            self.options,
            fade_images=self.options.fade_images if fade_images is None else fade_images,
            stage_images=self.options.stage_images if stage_images is None else stage_images,
        )
        kept = [phase for phase in self.phases if phase.start <= self.images]
        if kept and kept[-1].end > self.images:
            current = kept[-1]
            count = options.fade_images if current.fading else options.stage_images
            kept[-1] = replace(current, images=max(count, self.images - current.start))
        self.options, self.phases = options, schedule(options, tuple(kept))

    @property
    def complete(self) -> bool:
        return phase_at(self.phases, self.images) is None

    def grow(self) -> None:
        """Add the next resolution to both networks and the average; fresh optimizers."""
        self.stage += 1
        config = network_config(self.options, self.stage)
        # the new layers' initialization depends on seed and stage only, so a resumed run grows the same
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed * 1000 + self.stage)
            self.generator = grown(self.generator, PGGANGenerator(config))
            self.discriminator = grown(
                self.discriminator, PGGANDiscriminator(config, self.options.minibatch_group)
            )
        average = copy.deepcopy(self.generator)  # the new layers start equal to the generator's
        self.average = grown(self.average, average)
        self.average_steps = 0
        self.optimizer_g = _adam(self.generator, self.options)
        self.optimizer_d = _adam(self.discriminator, self.options)

    def set_alpha(self, alpha: float) -> None:
        for network in (self.generator, self.average):
            network.config = replace(network.config, alpha=alpha)
        self.discriminator.alpha = alpha

    def real_batch(self, data: Tensor, resolution: int, alpha: float) -> Tensor:
        index = torch.randint(len(data), (self.options.batch_sizes[self.stage],), generator=self.rng)
        real = data[index].float() / 127.5 - 1.0
        if resolution < real.shape[-1]:
            real = F.avg_pool2d(real, real.shape[-1] // resolution)
        if alpha > 0:  # the paper fades the reals too: blend with their half-resolution copy
            coarse = F.interpolate(F.avg_pool2d(real, 2), scale_factor=2.0, mode="nearest")
            real = alpha * coarse + (1.0 - alpha) * real
        return real

    def latents(self, count: int) -> Tensor:
        return torch.randn(count, self.options.latent_dim, generator=self.rng)

    def step(self, data: Tensor, alpha: float) -> dict[str, float]:
        """One critic step and one generator step on a fresh minibatch; returns the losses."""
        options = self.options
        self.set_alpha(alpha)
        real = self.real_batch(data, 4 * 2**self.stage, alpha)
        with torch.no_grad():
            fake = self.generator(self.latents(len(real)))
        score_real = self.discriminator(real)
        score_fake = self.discriminator(fake)
        mix = torch.rand(len(real), 1, 1, 1, generator=self.rng)
        between = (mix * real + (1.0 - mix) * fake).requires_grad_(True)
        (gradient,) = torch.autograd.grad(self.discriminator(between).sum(), between, create_graph=True)
        penalty = (gradient.flatten(1).norm(dim=1) - 1.0).square().mean()
        wasserstein = score_real.mean() - score_fake.mean()
        drift = score_real.square().mean()
        loss_d = -wasserstein + options.lambda_gp * penalty + options.epsilon_drift * drift
        self.optimizer_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimizer_d.step()

        for parameter in self.discriminator.parameters():
            parameter.requires_grad_(False)
        loss_g = -self.discriminator(self.generator(self.latents(len(real)))).mean()
        self.optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.optimizer_g.step()
        for parameter in self.discriminator.parameters():
            parameter.requires_grad_(True)
        # warm-up as TensorFlow's ExponentialMovingAverage(num_updates): with a few hundred steps per
        # phase, a fixed 0.995 would keep a third of the random initialization in the average
        decay = min(options.ema_decay, (1.0 + self.average_steps) / (10.0 + self.average_steps))
        self.average_steps += 1
        with torch.no_grad():
            for average, parameter in zip(
                self.average.parameters(), self.generator.parameters(), strict=True
            ):
                average.lerp_(parameter, 1.0 - decay)
        self.images += len(real)
        return {
            "loss_d": loss_d.item(),
            "loss_g": loss_g.item(),
            "wasserstein": wasserstein.item(),
            "gradient_penalty": penalty.item(),
        }

    def checkpoint(self) -> dict:
        """Zoo layout ({'config', 'netG', 'netD', 'avgG'}) plus our resumable state under 'training'."""
        return {
            "config": zoo_config(self.generator.config, self.options),
            "netG": self.generator.state_dict(),
            "netD": self.discriminator.state_dict(),
            "avgG": self.average.state_dict(),
            "training": {
                "options": self.options.to_dict(),
                "stage": self.stage,
                "phases": [asdict(phase) for phase in self.phases],
                "images": self.images,
                "seconds": self.seconds,
                "history": self.history,
                "average_steps": self.average_steps,
                "rng": self.rng.get_state(),
                "optimizer_g": self.optimizer_g.state_dict(),
                "optimizer_d": self.optimizer_d.state_dict(),
            },
        }

    @classmethod
    def from_checkpoint(cls, path: Path) -> "PGGANTraining":
        """A run restored from `training.pt`, networks loaded strictly."""
        loaded = read_checkpoint(path)
        state = loaded.get("training") if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a training checkpoint of this trainer (no 'training')")
        run = cls(PGGANTrainOptions.from_dict(state["options"]), stage=int(state["stage"]))
        alpha = float(loaded["config"]["alpha"])
        run.set_alpha(alpha)
        load_strict(run.generator, loaded["netG"], f"{path.name} (netG)")
        load_strict(run.discriminator, loaded["netD"], f"{path.name} (netD)")
        load_strict(run.average, loaded["avgG"], f"{path.name} (avgG)")
        if "phases" in state:  # else the options' uniform schedule, as at the start
            run.phases = [Phase(**phase) for phase in state["phases"]]
        run.optimizer_g.load_state_dict(state["optimizer_g"])
        run.optimizer_d.load_state_dict(state["optimizer_d"])
        run.rng.set_state(state["rng"])
        run.images, run.seconds, run.history = int(state["images"]), float(state["seconds"]), state["history"]
        run.average_steps = int(state["average_steps"])
        return run

    def release(self) -> dict:
        """What ships: the zoo layout without optimizer state ({'config', 'avgG', 'netG', 'netD'})."""
        checkpoint = self.checkpoint()
        checkpoint.pop("training")
        return checkpoint

    @torch.no_grad()
    def samples(self, count: int = SAMPLE_COUNT) -> np.ndarray:
        """uint8 [count, R, R] images of the moving-average generator from the fixed sample latents."""
        latents = torch.randn(
            count, self.options.latent_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED)
        )
        return to_uint8(self.average.eval()(latents))


def save_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    tmp.replace(path)


def write_sheet(run: PGGANTraining, out_dir: Path) -> Path:
    """The end-of-resolution contact sheet, every resolution shown at the final size."""
    resolution = 4 * 2**run.stage
    scale = SHEET_SCALE * run.options.resolution // resolution
    path = out_dir / f"samples_{resolution}x{resolution}.png"
    Image.fromarray(contact_sheet(run.samples(), 8, gap=2, background=128, scale=scale)).save(path)
    return path


def train_pggan(
    run: PGGANTraining,
    data: Tensor,
    out_dir: Path,
    max_seconds: float | None = None,
    max_images: int | None = None,
    checkpoint_seconds: float = 120.0,
    log_seconds: float = 30.0,
    log: Callable[[str], None] = print,
) -> bool:
    """Train until the schedule is complete, `max_seconds` of this call have passed or `max_images`
    images have been shown in all; checkpoints to `out_dir` regularly, at every resolution's end and on
    return. Returns whether training is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    total = run.phases[-1].end
    started = last_log = last_save = time.monotonic()
    seconds_at_start, images_at_log = run.seconds, run.images
    sums: dict[str, float] = {}
    steps = 0

    def save() -> None:
        run.seconds = seconds_at_start + time.monotonic() - started
        save_atomic(run.checkpoint(), out_dir / TRAINING_FILE)
        (out_dir / HISTORY_FILE).write_text(json.dumps(run.history) + "\n")

    while (phase := phase_at(run.phases, run.images)) is not None:
        if max_seconds is not None and time.monotonic() - started >= max_seconds:
            break
        if max_images is not None and run.images >= max_images:
            break
        if phase.stage > run.stage:
            run.grow()
            log(f"grew to {phase.resolution}x{phase.resolution}")
        alpha = fade_alpha(phase, run.images)
        for key, value in run.step(data, alpha).items():
            sums[key] = sums.get(key, 0.0) + value
        steps += 1
        now = time.monotonic()
        finished_phase = run.images >= phase.end
        if now - last_log >= log_seconds or finished_phase:
            rate = (run.images - images_at_log) / max(now - last_log, 1e-9)
            means = {key: value / steps for key, value in sums.items()}
            run.history.append(
                {
                    "images": run.images,
                    "resolution": phase.resolution,
                    "alpha": alpha,
                    "seconds": round(seconds_at_start + now - started, 1),
                    **means,
                }
            )
            name = "fade-in" if phase.fading else "stable"
            log(
                f"{phase.resolution}x{phase.resolution} {name} alpha {alpha:.2f}: "
                f"{run.images:,}/{total:,} images, D {means['loss_d']:.3f} G {means['loss_g']:.3f} "
                f"W {means['wasserstein']:.3f} GP {means['gradient_penalty']:.3f}, {rate:.0f} images/s"
            )
            sums, steps, last_log, images_at_log = {}, 0, now, run.images
        if finished_phase and not phase.fading:
            run.set_alpha(0.0)
            log(f"contact sheet {write_sheet(run, out_dir)}")
        if finished_phase or now - last_save >= checkpoint_seconds:
            save()
            last_save = now
    save()
    if run.complete:
        run.set_alpha(0.0)
        save_atomic(run.release(), out_dir / RELEASE_FILE)
    return run.complete
