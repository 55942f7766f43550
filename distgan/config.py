"""The typed config tree: YAML presets shipped in the package + a user YAML + dotted overrides.

The schema is a tree of dataclasses; OmegaConf checks every key and type against it, and
this module turns OmegaConf's errors into one-line `UserError`s that list the valid keys. Everything
about one key sits on its field: type, default, its doc (the comment on or above it, which
docs/config.md is generated from) and its own rule (`one_of`, `at_least`, `between`, `checked`).
`validate` checks those rules and then only the rules between keys; a variant's own rules are its
`check_config` (distgan/variants/base.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from distgan import augment, losses, penalties
from distgan.errors import UserError

DEFAULT_PRESET = "digits-dcgan"


def one_of(default, choices: tuple):
    """A key that takes one of `choices` (checked by `validate`, listed in the config reference)."""
    return field(default=default, metadata={"choices": tuple(choices)})


def at_least(low: float, default: float):
    """A key whose value must be >= `low` (checked by `validate`, said in the config reference)."""
    return field(default=default, metadata={"min": low})


def checked(default, check):
    """A key with a grammar of its own: `check(key, value)` raises a UserError for a bad value. A
    callable `default` is a factory (lists)."""
    if callable(default):
        return field(default_factory=default, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _augment_policy(key: str, value: str) -> None:
    augment.parse(value)


def _ada_multipliers(key: str, value: str) -> None:
    augment.multipliers(value)


def _probability_or_auto(key: str, value: str) -> None:
    if value == "auto":
        return
    try:
        p = float(value)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise UserError(f"config key '{key}' must be a probability in [0, 1] or auto; got '{value}'")


def _image_member(key: str, value: str) -> None:
    from distgan.data.stream import IMAGE_EXTS

    if value.lstrip(".") not in ("", *IMAGE_EXTS):
        raise UserError(
            f"config key '{key}' must be '' (the first present) or one of {', '.join(IMAGE_EXTS)}; got '{value}'"
        )


def _label_member(key: str, value: str) -> None:
    if value not in ("", "cls", "label") and not (value.startswith("json:") and len(value) > 5):
        raise UserError(f"config key '{key}' must be '' (cls, else label), cls, label or json:FIELD; got '{value}'")


def _maxout_pieces(key: str, value: int) -> None:
    if value < 0 or value == 1:
        raise UserError(f"config key '{key}' must be 0 (off) or >= 2 pieces, got {value}")


def between(low: float, high: float, default: float, low_open: bool = False):
    """A key whose value must lie in [low, high) ((low, high) with `low_open`)."""
    return field(default=default, metadata={"range": (low, high, low_open)})


@dataclass
class DataConfig:
    # A local path, brace pattern, http(s):// or pipe: URL; "builtin:NAME" builds NAME's shards into the cache.
    shards: str = "builtin:digits"
    # images (KEY.png), points (KEY.npy: data.channels-dim vectors, e.g. the 2-D mixtures), paired
    # (KEY.input.png + KEY.target.png: image-to-image pairs, e.g. pix2pix), or latents (KEY.npy: a VAE's
    # (data.channels, data.resolution, data.resolution) latents from `distgan shards --encode`; model.vae
    # decodes G's samples)
    kind: str = one_of("images", ("images", "points", "paired", "latents"))
    # latents encoded with `--posterior`: each read a fresh draw from the VAE's posterior, mean + std * eps
    # (REPA's and GAT's sample_posterior), eps seeded by (train.seed, rank, worker, position), so a
    # resume draws the same; false: the posterior mean. Evaluation reads take the mean.
    posterior: bool = False
    # Unpaired image-to-image (cyclegan): the two domains' shard sets, streamed independently
    # (same forms as data.shards); data.shards is then unused.
    shards_a: str = ""
    shards_b: str = ""  # cyclegan: domain B's shard set (see data.shards_a)
    input_channels: int = one_of(0, (0, 1, 3))  # paired data: channels of KEY.input.png (0: data.channels)
    # images are cropped to a square (data.crop) and resized (PIL bilinear) to this size
    resolution: int = at_least(1, 16)
    channels: int = at_least(1, 1)  # 1 or 3 (points: the vector size; latents: the VAE's); must match the shards
    batch_size: int = at_least(1, 64)  # per process and per micro-batch
    # DataLoader workers per process; -1: auto (data.stream.auto_workers): on the CPU none below
    # 4 cores per process (a worker would fight the step for them), else 1; on GPUs up to 4.
    num_workers: int = at_least(-1, -1)
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer
    on_error: str = one_of("raise", ("raise", "skip"))  # raise: stop on a corrupt sample; skip: count and skip it
    # a shard member larger than this (its size after decompression) is never read: the sample is a bad
    # one (data.on_error). Bounds the memory one file can take; real images are far smaller
    max_member_bytes: float = at_least(1, 64e6)
    # an image with more pixels than this (from its header; JPEGs after DCT downscaling) is never decoded:
    # a bad sample (data.on_error). 50e6 keeps a 48-megapixel photo; a decoded pixel costs up to 16 bytes
    max_image_pixels: float = at_least(1, 50e6)
    # the image member of each sample: "" takes the first present of png, jpg, jpeg, webp, ppm, bmp,
    # tif, tiff (paired data: input.EXT and target.EXT); or name one extension
    image_key: str = checked("", _image_member)
    # the label: "" takes KEY.cls, else KEY.label (text or int); or cls, label, json:FIELD (a field of
    # KEY.json, as img2dataset writes). No label is fine for unconditional variants
    label_key: str = checked("", _label_member)
    # images that are not square: center (crop the centred square), random (a square at a place
    # drawn per sample, reproducible on resume), none (no crop: the whole image squeezed to the square;
    # images smaller than data.resolution are refused). Then resized, PIL bilinear, to data.resolution
    crop: str = one_of("center", ("center", "random", "none"))
    # keep decoded samples in RAM after a shard's first read (uint8, at data.resolution), so later
    # reads skip tar and decode; the stream (order, positions, resume) is exactly the uncached one.
    # auto: for the embedded builtin: sets; ram: always; off. Not with data.crop=random
    cache: str = one_of("auto", ("auto", "ram", "off"))
    # data.cache: bytes per rank (split over its workers); shards beyond it are re-read
    cache_bytes: float = at_least(0, 4e9)
    # augmentation of every image D sees in training, real and fake: a comma-separated list of DiffAugment's
    # color, translation, cutout (Zhao et al. 2020) and StyleGAN2-ADA's ada-geometric, ada-color; ada: its
    # pipeline as R3GAN uses it (ada-geometric, ada-color, cutout); distgan/augment.py. Empty: none
    augment: str = checked("", _augment_policy)
    # the ada ops' probability multipliers, name=value,... over R3GAN's (xflip, rotate90, xint, scale, rotate,
    # aniso, xfrac: 1; brightness, contrast, lumaflip, hue, saturation: 0.5); '' = those
    ada_multipliers: str = checked("", _ada_multipliers)
    # probability of each augmentation op per image, in [0, 1]; auto: ADA's adaptive p (Karras et al.
    # 2020), from 0, raised while E[sign D(real)] > data.augment_target; logged as augment/p
    augment_p: str = checked("1.0", _probability_or_auto)
    augment_target: float = between(0.0, 1.0, 0.6, low_open=True)  # data.augment_p=auto: the target of E[sign D(real)]


@dataclass
class GeneratorConfig:
    # dcgan, resnet (BigGAN-style, 32-256 px), r3gan (R3GAN's, model.r3gan), vit (GAT-style transformer,
    # model.vit), mlp or toy; image-to-image: unet, resnet (cyclegan's) or srresnet (srgan)
    arch: str = "dcgan"
    z_dim: int = at_least(1, 64)  # size of the latent noise z
    width: int = at_least(1, 64)  # base channel width (DCGAN, resnet: times BigGAN's multipliers) or hidden width (MLP)
    # cgan: size of the label embedding (concatenated to z; resnet: the shared embedding of its conditional BNs)
    embed_dim: int = at_least(1, 16)
    spectral_norm: bool = False  # spectral norm on every conv and linear layer of G (BigGAN), via kernels/
    hierarchical: bool = False  # resnet cgan: z split into one chunk per block, each fed to its BNs (BigGAN)
    attention: int = 0  # resnet: SAGAN self-attention after the block of this resolution; 0: none
    batchnorm: bool = True  # resnet: BatchNorm in G; false: no normalisation (R3GAN), zero-init residual branches
    blocks: int = at_least(1, 6)  # resnet (cyclegan) and srresnet (srgan) generators: residual blocks


@dataclass
class DiscriminatorConfig:
    # dcgan, resnet (BigGAN-style, 32-256 px), r3gan (R3GAN's, model.r3gan), vit (GAT-style transformer,
    # model.vit), mlp or toy; image-to-image: patchgan or srgan
    arch: str = "dcgan"
    width: int = at_least(1, 64)  # base channel width (DCGAN) or hidden width (toy MLP)
    # Minibatch discrimination (Salimans et al. 2016) before D's last layer, via kernels/.
    minibatch_discrimination: bool = False
    mbd_kernels: int = at_least(1, 100)  # minibatch discrimination: kernels (B in the paper)
    mbd_kernel_dim: int = at_least(1, 5)  # minibatch discrimination: dimension of each kernel (C in the paper)
    # Spectral norm (Miyato et al. 2018) on every conv and linear layer, via kernels.spectral_norm;
    # the DCGAN discriminator then drops its BatchNorm, as SNGAN's does.
    spectral_norm: bool = False
    # BatchNorm in the DCGAN discriminator; null (auto): on, except with spectral norm (as SNGAN's D)
    batchnorm: bool | None = None
    # cgan: projection (Miyato & Koyama 2018) or concat (the label as an extra input channel)
    conditioning: str = one_of("projection", ("projection", "concat"))
    # toy D (2-D mixtures): maxout units of this many pieces (PacGAN's D: 5); 0: LeakyReLU
    maxout: int = checked(0, _maxout_pieces)
    attention: int = 0  # resnet: SAGAN self-attention after the block of this resolution; 0: none
    layers: int = at_least(1, 3)  # patchgan: strided conv layers (3: the 70x70 PatchGAN of pix2pix/CycleGAN)


def _stage_list(key: str, value: list) -> None:
    if not value or any(v < 1 for v in value):
        raise UserError(f"config key '{key}' needs one entry >= 1 per stage (4x4 first); got {list(value)}")


@dataclass
class R3GANConfig:
    """R3GAN's networks (model.g.arch / model.d.arch = r3gan, distgan/models/r3gan.py). The lists have one
    entry per stage from 4x4 up to data.resolution, in G's order; D mirrors them."""

    # channels of each stage (R3GAN's CIFAR-10: 768 x 4)
    widths: list[int] = checked(lambda: [64, 64, 64, 64], _stage_list)
    # groups of each stage's grouped 3x3 convs (R3GAN's CIFAR-10: 96 x 4)
    cardinalities: list[int] = checked(lambda: [8, 8, 8, 8], _stage_list)
    blocks: list[int] = checked(lambda: [1, 1, 1, 1], _stage_list)  # residual blocks of each stage (R3GAN: 2)
    expansion: int = at_least(1, 2)  # channel expansion inside a block (R3GAN: 2)
    # that many of the lowest-resolution stages (G's first, D's last) compute in fp32 even under
    # train.mixed_precision (R3GAN: the 4x4 stage at 32 px, up to the 16x16 one at 256 px)
    fp32_stages: int = at_least(0, 0)
    # conditional: G's label embedding, concatenated to z (0: model.g.z_dim); D's embedding is its 4x4 width
    embed_dim: int = at_least(0, 0)


@dataclass
class ViTConfig:
    """Transformer G and D in the GAT style (model.g.arch / model.d.arch = vit, distgan/models/vit.py)."""

    # GAT's sizes: S (width 384, depth 12, 6 heads), B (768, 12, 12), L (1024, 24, 16), XL (1152, 28, 16);
    # custom: model.vit.width, depth, heads
    size: str = one_of("custom", ("S", "B", "L", "XL", "custom"))
    width: int = at_least(8, 64)  # size=custom: the token width
    depth: int = at_least(1, 4)  # size=custom: blocks
    heads: int = at_least(1, 4)  # size=custom: attention heads (the head dimension a multiple of 4: 2-D RoPE)
    patch: int = at_least(1, 2)  # pixels (or latent cells) per patch side: GAT's /2, /4, /8
    mlp_ratio: float = at_least(1, 4.0)  # SwiGLU hidden width = 2/3 x mlp_ratio x width
    levels: int = at_least(1, 4)  # G's multi-level outputs, summed into the image (GAT: 4)
    cmap: int = at_least(1, 256)  # D's projection features (GAT: 2048)
    # learning-rate multiplier of G's mapping MLP (z and class -> w), StyleGAN's and GAT's 0.01: its Adam
    # steps are that fraction of G's
    map_lr_mult: float = between(0.0, 100.0, 0.01, low_open=True)
    # D's class embedding mapped by two linear layers (lr multiplier 0.01) and the logit their plain dot
    # product, as GAT's D (its LabelEmbedder); false: a plain embedding, the dot product / sqrt(cmap). On the
    # 16 px digits GAT's form let D win outright (docs/results.md), so the digits presets keep false
    class_map: bool = False
    # D's minibatch standard deviation (StyleGAN's, here for tokens): over groups of this many consecutive
    # samples, each channel's std of D's final tokens (RMS-normalised), averaged over the tokens, mapped by
    # a linear layer to the cmap features before the class projection, so D sees how much a group varies.
    # A batch not divisible by it uses its largest divisor below it. 0 = off (GAT)
    mbstd: int = at_least(0, 0)


@dataclass
class AlignConfig:
    """GAT's alignment of D's tokens with a frozen DINOv2 (distgan/align.py); needs model.d.arch=vit."""

    # DINOv2 weights (Meta's dinov2_vit*14*_pretrain.pth or Hugging Face's model.safetensors); "" = off.
    # Frozen, never saved in checkpoints, never taken from a checkpoint's stored config
    encoder: str = ""
    resolution: int = at_least(14, 224)  # the encoder's input size (a multiple of its 14-pixel patch)
    proj_dim: int = at_least(1, 2048)  # hidden width of D's projector onto the encoder's features (GAT: 2048)
    weight: float = at_least(0, 1.0)  # weight of the alignment term in D's loss (GAT's proj_coeff: 1.0)


@dataclass
class ModelConfig:
    g: GeneratorConfig = field(default_factory=GeneratorConfig)
    d: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    num_classes: int = 0  # cgan: classes of the labels (the shards' .cls); 0: unconditional
    r3gan: R3GANConfig = field(default_factory=R3GANConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    # r3gan: how the grouped 3x3 convs run: native (conv2d with groups), block_diagonal (a dense conv with
    # a block-diagonal weight: the same values, faster on GPUs at small maps) or auto (block_diagonal on
    # CUDA at maps up to 16x16)
    grouped_conv: str = one_of("native", ("native", "block_diagonal", "auto"))
    # data.kind=latents: the VAE that encoded the shards (a diffusers AutoencoderKL folder; distgan/vae.py),
    # frozen, used to decode samples (grids, distgan sample, metrics); never saved in checkpoints, and
    # never taken from a checkpoint's stored config
    vae: str = ""


@dataclass
class VariantConfig:
    # gan, wgan (weight clipping), wgan-gp (gradient penalty), sngan, cgan, unrolled; image-to-image:
    # pix2pix, cyclegan, srgan
    name: str = "gan"
    # ns: non-saturating BCE (the seed's); minimax: the saturating original; hinge; ls (LSGAN);
    # wasserstein (the wgan variants' critic loss); rpgan (relativistic pairing, R3GAN's)
    loss: str = one_of("ns", losses.LOSSES)
    n_critic: int = at_least(1, 1)  # D (critic) steps per G step, each on its own real batch
    clip: float = 0.01  # wgan: critic weights are clamped to [-clip, clip] after each step
    gp_weight: float = 10.0  # wgan-gp: lambda of the gradient penalty
    # R1 (Mescheder et al. 2018): D's loss gets r1_gamma / 2 * E_real |grad_x D(x)|^2; 0 = off. Any loss.
    r1_gamma: float = at_least(0, 0.0)
    # R2: D's loss gets r2_gamma / 2 * E_fake |grad_x D(G(z))|^2 (R3GAN uses R1 + R2); 0 = off
    r2_gamma: float = at_least(0, 0.0)
    # how R1, R2 and WGAN-GP's penalty are computed (distgan/penalties.py): exact (differentiated twice;
    # no train.compile), approx (a finite difference with step variant.penalty_sigma: first derivatives
    # only, compiles) or lazy (exact, every variant.penalty_every-th D step, StyleGAN2's lazy R1)
    penalty_mode: str = one_of("exact", penalties.MODES)
    # approx: the finite-difference step sigma of (D(x + sigma eps) - D(x)) / sigma, on D's input scale
    penalty_sigma: float = between(0.0, 1.0, 0.01, low_open=True)
    # lazy: a regularisation step (weight x k, own optimizer step) after every k-th D step; D's Adam lr
    # and betas are rescaled by k / (k + 1)
    penalty_every: int = at_least(1, 16)
    # train.schedule_images: r1_gamma and r2_gamma end at this multiple of themselves (R3GAN: 0.1)
    gamma_end_factor: float = at_least(0, 0.1)
    # LeCam (Tseng et al. 2021): D's loss gets lecam_weight * (E|D(x) - a_F|^2 + E|D(G(z)) - a_R|^2), with
    # a_R, a_F EMAs (variant.lecam_decay) of D's mean real/fake outputs, kept in checkpoints; 0 = off
    lecam_weight: float = at_least(0, 0.0)
    lecam_decay: float = between(0.0, 1.0, 0.99)  # LeCam: decay of the EMAs a_R, a_F of D's mean outputs
    # BigGAN's orthogonal regularisation of G: ortho_reg * sum_W ||W W^T * (1 - I)||_F^2 in G's loss; 0 = off
    ortho_reg: float = at_least(0, 0.0)
    # multi-level noise-perturbed guidance (GAT): D judges G's model.vit.levels partial outputs together,
    # stacked as channels, each noised at its own level t_i (the earliest most), reals repeated and noised
    # the same way (distgan/guidance.py); needs model.g.arch=vit
    multilevel: bool = False
    # multilevel: the noise schedule t_i = 1 - m^(1 - i / (L - 1)) + 0.01 for levels i = 0 .. L - 1, with
    # m this minimum information (GAT: 0.125): the final image gets t = 0.01, the earliest 1.01 - m
    multilevel_min_info: float = between(0.0, 1.0, 0.125, low_open=True)
    # cgan: the labels fakes are drawn with in training: uniform over the classes, or real: those of the
    # real micro-batch beside them, so rpgan pairs each fake with a real of the same class (GAT)
    fake_labels: str = one_of("uniform", ("uniform", "real"))
    pack: int = at_least(1, 1)  # PacGAN (Lin et al. 2018): D judges `pack` samples at once, stacked as channels
    unroll_steps: int = at_least(1, 5)  # unrolled: D steps unrolled for G's loss (Metz et al. 2017)
    unroll_grad: bool = True  # unrolled: gradients flow through the unrolled steps (the paper's full version)
    # Image-to-image (pix2pix, cyclegan, srgan)
    gan_weight: float = at_least(0, 1.0)  # weight of G's adversarial loss; pix2pix with 0 is the L1-only U-Net baseline
    l1_weight: float = at_least(0, 100.0)  # pix2pix: lambda of the L1 term (Isola et al. 2017)
    cycle_weight: float = at_least(0, 10.0)  # cyclegan: lambda of the cycle-consistency loss (Zhu et al. 2017)
    identity_weight: float = at_least(0, 0.5)  # cyclegan: identity loss, as a fraction of cycle_weight
    pool_size: int = at_least(0, 50)  # cyclegan: image-history buffer per rank for D (0: off)
    scale: int = one_of(4, (2, 4))  # srgan: upscaling factor (2 or 4); LR = bicubic downscale of the HR crop
    crop: int = at_least(0, 0)  # srgan: random HR crop size taken from each training image (0: the whole image)
    pretrain_steps: int = at_least(0, 1000)  # srgan: steps on the pixel loss alone before adversarial training
    pixel_loss: str = one_of("mse", ("l1", "mse"))  # srgan: l1 or mse
    # srgan: weight of the adversarial term after pre-training (Ledig et al. 2017)
    adv_weight: float = at_least(0, 1.0e-3)
    vgg_weights: str = ""  # srgan: a local VGG19 state dict (torchvision layout) for the perceptual loss
    vgg_weight: float = at_least(0, 6.0e-3)  # srgan: weight of the VGG feature loss (features rescaled by 1/12.75)


@dataclass
class TrainConfig:
    steps: int = at_least(1, 3000)  # optimizer steps (each: the variant's D step(s) and one G step)
    seed: int = 0  # seeds the models, the noise and the data stream
    lr_g: float = 2e-4  # G's Adam learning rate
    lr_d: float = 2e-4  # D's Adam learning rate
    beta1: float = 0.5  # Adam beta1 of both optimizers
    beta2: float = 0.999  # Adam beta2 of both optimizers
    # weight decay of both optimizers: Adam becomes AdamW (decoupled, Loshchilov & Hutter 2019); wgan's
    # RMSprop takes it as L2. 0: none
    weight_decay: float = at_least(0, 0.0)
    # each optimizer's gradients scaled down to this total L2 norm at most (after the all-reduce, on the
    # device: no host sync; GAT: 1.0); 0: no clipping
    grad_clip: float = at_least(0, 0.0)
    # width-aware learning rates (GAT): a vit G's or D's lr is multiplied by lr_ref_width / its width
    # (GAT: 768, B's width); 0: off
    lr_ref_width: int = at_least(0, 0)
    # learning-rate schedule of every optimizer: none (constant), or linear: constant until
    # lr_decay_start x steps, then linearly down towards 0 at train.steps (a function of the step alone)
    lr_decay: str = one_of("none", ("none", "linear"))
    # fraction of train.steps after which train.lr_decay starts
    lr_decay_start: float = between(0.0, 1.0, 0.0)
    # R3GAN's schedules: over this many images (steps x data.batch_size x grad_accum x processes) the lrs go
    # x1 -> train.lr_end_factor, Adam beta2 train.beta2_start -> train.beta2, R1/R2 gamma x1 ->
    # variant.gamma_end_factor, a fixed data.augment_p from 0 up, the EMA half-life 0 ->
    # train.ema_halflife_images, each along half a cosine, then held; logged as schedule/*. 0: off
    schedule_images: int = at_least(0, 0)
    lr_end_factor: float = at_least(0, 0.25)  # train.schedule_images: the lrs' final multiplier (R3GAN: 5e-5 / 2e-4)
    beta2_start: float = between(0.0, 1.0, 0.9)  # train.schedule_images: Adam beta2 at the start (R3GAN: 0.9)
    # train.schedule_images: the EMA of G with a half-life in images ramped from 0 to this (R3GAN: 5e5 at
    # 64-256 px); 0: train.ema_beta
    ema_halflife_images: float = at_least(0, 0.0)
    grad_accum: int = at_least(1, 1)  # micro-batches per step, for G and D alike
    mixed_precision: str = one_of("auto", ("auto", "no", "bf16", "fp16"))
    on_nan: str = one_of("skip", ("skip", "stop"))
    max_nan_skips: int = at_least(1, 20)  # consecutive skipped steps before the run stops anyway
    # EMA of G's weights (with a warm-up), used for every sample; 0: the live G
    ema_beta: float = between(0.0, 1.0, 0.999)
    log_every: int = at_least(1, 50)  # steps between metric logs (metrics.jsonl, W&B)
    sample_every: int = at_least(1, 500)  # steps between sample grids (RUN_DIR/samples/)
    ckpt_every: int = at_least(1, 1000)  # steps between checkpoints (also written at the end and on SIGINT/SIGTERM)
    keep_last: int = at_least(1, 3)  # checkpoints kept; older ones are deleted
    # write checkpoint files on a background thread: the step waits only for the copy to host memory
    # (at most one save in flight; a run waits for it before it ends). null (auto): on with CUDA
    ckpt_async: bool | None = None
    n_samples: int = at_least(1, 100)  # images in each sample grid
    # every eval_every steps (0: never) rank 0 draws eval_n samples from EMA-G and logs the metrics
    # `distgan eval` would give (eval/...), where the data has some
    eval_every: int = at_least(0, 0)
    eval_n: int = at_least(2, 2500)  # samples drawn for each train.eval_every evaluation
    # the Inception weights file (NVIDIA's inception-2015-12-05.pt or pytorch-fid's .pth) for the
    # standard fid/kid/is/pr in each evaluation, the work split over the ranks (docs/evaluation.md);
    # "": only the built-in metrics. Never taken from a checkpoint
    eval_inception: str = ""
    eval_ref: str = ""  # with eval_inception: reference statistics (`distgan stats`) instead of the shards'
    # "fid": also keep the checkpoint with the lowest eval/fid so far, in RUN/checkpoints/best-fid/
    # (beside the last keep_last); needs eval_every and a fid (Inception, or the digits features)
    keep_best: str = one_of("", ("", "fid"))
    # torch.compile the models (Inductor): faster steps on a GPU after a compile of a minute or more
    compile: bool = False
    # under train.compile: spectral norm and minibatch discrimination run as distgan's custom ops (the
    # Triton kernels on CUDA, one opaque call each); false: Inductor fuses their PyTorch ops itself
    compile_kernels: bool = True
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions (Ampere and newer); no effect on the CPU
    channels_last: bool = False  # conv models and image batches in channels_last memory format
    # spectral-norm layers use W / sigma (weight), or Linear and Conv layers compute op(x, W) / sigma
    # (output: W / sigma is never written, half the memory traffic); the same function and gradients
    sn_scale: str = one_of("weight", ("weight", "output"))
    # with several ranks: steps between the agreement on a stop signal (SIGINT/SIGTERM), one small
    # all-reduce read on the host; also at every log and checkpoint step
    stop_check_every: int = at_least(1, 10)


@dataclass
class WandbConfig:
    # online, offline, disabled; auto: online with an API key, else offline
    mode: str = one_of("auto", ("auto", "online", "offline", "disabled"))
    project: str = "distgan"  # W&B project (never taken from a checkpoint: docs/security.md)
    entity: str | None = None  # W&B entity (team or user); null: your default
    name: str | None = None  # W&B run name; null: the run directory's name


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DistConfig:
    # A collective that waits longer than this (a dead or hung rank) fails the run with an error
    # instead of hanging; also bounds the wait for all ranks at start-up and at checkpoints.
    timeout_s: int = at_least(1, 600)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def list_presets() -> list[str]:
    folder = resources.files("distgan") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _valid_keys(path: str) -> list[str]:
    """The keys the schema allows at dotted `path` (the parent of an unknown key)."""
    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            break
        node = fields[part].type
        node = globals().get(node, node) if isinstance(node, str) else node
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _explain(exc: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = ", ".join(_valid_keys(parent))
        where = f"'{parent}'" if parent else "the top level"
        return UserError(f"unknown config key '{key}' (from {source}); valid keys in {where}: {valid}")
    if isinstance(exc, ValidationError):
        msg = str(exc).split("\n")[0]
        return UserError(f"bad value for config key '{key}' (from {source}): {msg}")
    return UserError(f"bad config (from {source}): {str(exc).splitlines()[0]}")


def _merge(base: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None


def load_config(
    preset: str | None = None, config_file: str | None = None, overrides: list[str] = (), base: dict | None = None
) -> Config:
    """Build the config: schema defaults <- preset (or the default preset) <- YAML file <- overrides.

    `base` (e.g. a checkpoint's config) replaces the default preset when neither a preset nor a
    file is given."""
    cfg = OmegaConf.structured(Config)
    if base is not None and preset is None and config_file is None:
        cfg = _merge(cfg, OmegaConf.create(base), "checkpoint config")
    elif preset is not None or config_file is None:
        name = preset or DEFAULT_PRESET
        if name not in list_presets():
            raise UserError(f"unknown preset '{name}'; available presets: {', '.join(list_presets())}")
        text = (resources.files("distgan") / "presets" / f"{name}.yaml").read_text()
        cfg = _merge(cfg, OmegaConf.create(text), f"preset {name}")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file '{config_file}' does not exist")
        try:
            user = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in several types
            raise UserError(f"config file '{config_file}' is not valid YAML: {exc}") from None
        cfg = _merge(cfg, user, f"config file {config_file}")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.steps=200)")
        key, value = item.split("=", 1)
        if dataclasses.is_dataclass(_key_type(key)):  # a section, e.g. tracking.wandb=disabled
            raise UserError(
                f"override '{item}': '{key}' is a section, not a value; set one of its keys "
                f"({key}.KEY=VALUE): {', '.join(_valid_keys(key))}"
            )
        try:
            kind = _key_type(key)
            if kind in (str, str | None):
                # Taken literally: YAML would read webdataset's brace list {a.tar,b.tar} as a mapping
                # (and `no` as false); a quoted value loses its quotes, null is None where allowed.
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                literal = None if kind is not str and value in ("null", "~") else value
                dot = OmegaConf.create()
                OmegaConf.update(dot, key, literal, force_add=True)
            else:
                dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise UserError(f"override '{item}' cannot be parsed: {exc}") from None
        cfg = _merge(cfg, dot, f"override {item}")
    config: Config = OmegaConf.to_object(cfg)
    if config.train.mixed_precision == "False":  # YAML reads a bare `no` as false
        config.train.mixed_precision = "no"
    validate(config)
    return config


def _key_type(dotted: str):
    """The schema type of a dotted key (None when there is no such key: the merge reports it)."""
    import dataclasses
    import typing

    kind = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(kind):
            return None
        hints = typing.get_type_hints(kind)
        if part not in hints:
            return None
        kind = hints[part]
    return kind


def _listed(choices) -> str:
    return ", ".join(repr(c) if c == "" else str(c) for c in choices)


def _bounded(cfg, node=None, prefix: str = ""):
    """(dotted key, field metadata, value) of every key whose field states its choices or bounds."""
    node = cfg if node is None else node
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _bounded(cfg, value, f"{prefix}{f.name}.")
        elif f.metadata:
            yield prefix + f.name, f.metadata, value


def validate(cfg: Config) -> None:
    """A key's own rules live beside its field (one_of, at_least, between, checked: read here from the
    field metadata); below are only the rules between keys, then the variant's own (Variant.check_config)."""
    for key, meta, value in _bounded(cfg):
        if "min" in meta and value < meta["min"]:
            raise UserError(f"config key '{key}' must be >= {meta['min']}, got {value}")
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"config key '{key}' must be one of {_listed(meta['choices'])}; got '{value}'")
        if "check" in meta:
            meta["check"](key, value)
        if "range" in meta:
            low, high, low_open = meta["range"]
            if not (low < value if low_open else low <= value) or not value < high:
                raise UserError(
                    f"config key '{key}' must be in {'(' if low_open else '['}{low:g}, {high:g}), got {value}"
                )
    if cfg.data.kind == "latents" and not cfg.model.vae:
        raise UserError(
            "data.kind=latents needs model.vae: the VAE folder the latents were encoded with (it decodes the samples)"
        )
    if cfg.model.align.encoder:
        if cfg.model.d.arch != "vit":
            raise UserError(
                f"model.align.encoder aligns a vit D's tokens with the encoder's; model.d.arch is '{cfg.model.d.arch}' "
                "(set model.d.arch=vit or model.align.encoder='')"
            )
        if cfg.model.align.resolution % 14:
            raise UserError(
                f"model.align.resolution must be a multiple of 14 (DINOv2's patch), got {cfg.model.align.resolution}"
            )
        if cfg.variant.pack > 1:
            raise UserError("model.align.encoder does not combine with variant.pack > 1 (D judges packed samples)")
        if cfg.variant.penalty_mode == "lazy":
            raise UserError(
                "model.align.encoder does not combine with variant.penalty_mode=lazy (the regularisation step "
                "leaves D's projector out of a DDP backward); use variant.penalty_mode=approx, as GAT does"
            )
    if cfg.data.posterior and cfg.data.kind != "latents":
        raise UserError(f"data.posterior draws VAE latents; it needs data.kind=latents, not {cfg.data.kind}")
    if cfg.data.kind not in ("points", "latents") and cfg.data.channels not in (1, 3):
        raise UserError(f"config key 'data.channels' must be 1 or 3, got {cfg.data.channels}")
    if cfg.data.cache == "ram" and cfg.data.crop == "random":
        raise UserError(
            "config key 'data.cache=ram' keeps decoded crops, so it cannot combine with data.crop=random; "
            "use data.crop=center or data.cache=off"
        )
    if cfg.train.schedule_images and cfg.train.lr_decay != "none":
        raise UserError(
            "train.schedule_images schedules the learning rate itself; it cannot combine with train.lr_decay "
            f"'{cfg.train.lr_decay}' (set train.lr_decay=none)"
        )
    if cfg.train.ema_halflife_images and not cfg.train.schedule_images:
        raise UserError(
            "train.ema_halflife_images ramps the EMA over train.schedule_images, which is 0; set it too, or use "
            "train.ema_beta for a constant EMA"
        )
    if cfg.train.keep_best and not cfg.train.eval_every:
        raise UserError("config key 'train.keep_best=fid' needs evaluations: set train.eval_every too")
    if cfg.train.eval_ref and not cfg.train.eval_inception:
        raise UserError("config key 'train.eval_ref' holds Inception statistics: set train.eval_inception too")
    from distgan import variants  # late: the variants import torch and the models

    variant = variants.get(cfg.variant.name)  # (an unknown name: one line listing the known ones)
    variant.check_config(cfg)
    v = cfg.variant
    twice = variant.differentiates_twice(cfg)
    if cfg.train.compile and twice:
        raise UserError(
            f"train.compile=true cannot train {v.name} with {twice}: they differentiate D's gradients again, "
            f"which torch.compile does not support. {variant.compile_hint(cfg)}"
        )


def _field_comments(cls: type) -> dict[str, str]:
    """{field: its comment in this file}: the comment on the field's line, else the comment lines just
    above it. The config reference (`distgan config --doc`, docs/config.md) is made from these."""
    import inspect
    import io
    import tokenize

    lines, _ = inspect.getsourcelines(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for no, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if name not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        if no in comments:
            out[name] = comments[no]
            continue
        above, k = [], no - 1
        while k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        out[name] = " ".join(above)
    return out


def reference() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every config key, from the dataclasses above."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        notes = _field_comments(cls)
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
                continue
            key = prefix + f.name
            meaning = notes.get(f.name, "")
            if meaning and not meaning.endswith("."):
                meaning += "."
            if "choices" in f.metadata:
                meaning = f"{meaning} One of: {_listed(f.metadata['choices'])}.".strip()
            if "min" in f.metadata:
                meaning = f"{meaning} At least {f.metadata['min']:g}.".strip()
            if "range" in f.metadata:
                low, high, low_open = f.metadata["range"]
                meaning = f"{meaning} In {'(' if low_open else '['}{low:g}, {high:g}).".strip()
            default = "null" if value is None else json_text(value)
            rows.append((key, str(hints[f.name]), default, meaning))

    walk(Config, "")
    return rows


def json_text(value: Any) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else f'"{value}"'


def reference_markdown() -> str:
    """docs/config.md: the reference of every key, generated (`distgan config --doc`)."""
    head = (
        "# Config reference\n\n"
        "Generated from the config dataclasses in `distgan/config.py` by `distgan config --doc`; a test fails\n"
        "when this file and the code differ. Keys are set by a preset (`--preset NAME`), a YAML file\n"
        "(`--config FILE`) and `key=value` overrides, in that order. `distgan config --preset NAME [key=value ...]`\n"
        "prints the resolved config of any combination as YAML, to start a file of your own from.\n\n"
        "| key | type | default | meaning |\n|---|---|---|---|\n"
    )
    body = "".join(
        f"| `{k}` | {t.replace('|', chr(92) + '|')} | `{d}` | {m.replace('|', chr(92) + '|')} |\n"
        for k, t, d, m in reference()
    )
    return head + body


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved by `to_dict` (e.g. from a checkpoint's metadata)."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "checkpoint metadata")
    return OmegaConf.to_object(cfg)
