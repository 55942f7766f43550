"""CycleGAN (Zhu et al. 2017): unpaired translation between domains A and B.

Two ResNet generators (G_ab: A -> B, G_ba: B -> A) and two PatchGAN discriminators (D_a, D_b),
instance norm, LSGAN loss. G minimises L_adv(G_ab) + L_adv(G_ba) + cycle_weight * (|G_ba(G_ab(a))
- a| + |G_ab(G_ba(b)) - b|) + identity_weight * cycle_weight * (|G_ab(b) - b| + |G_ba(a) - a|).
Each D learns from an image-history buffer of `variant.pool_size` past fakes (Shrivastava et al.
2017), half of its fakes drawn from the buffer once it is full; D's loss is halved.

The domains stream independently from `data.shards_a` and `data.shards_b` (batch keys image_a,
image_b). The buffers are per rank; the trainer saves them in checkpoints (state tensors
variant.pool_a.*, variant.pool_b.*, one row per rank) so a resumed run continues exactly.
"""

from __future__ import annotations

import itertools

import torch

from distgan import losses
from distgan.errors import UserError
from distgan.models import image2image
from distgan.variants.translation import Translation


class ImagePool:
    """The last `size` fakes; `query` returns a batch where, once the pool is full, each image is
    with probability 1/2 swapped for a stored one (which the new image replaces)."""

    def __init__(self, size: int, shape: tuple[int, ...]):
        self.size = size
        self.images = torch.zeros(size, *shape)
        self.count = 0

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        if self.images.device != batch.device or self.images.dtype != batch.dtype:
            self.images = self.images.to(batch.device, batch.dtype)
        out = []
        for img in batch.detach():
            if self.count < self.size:
                self.images[self.count] = img
                self.count += 1
                out.append(img)
            elif torch.rand(()) < 0.5:
                i = int(torch.randint(0, self.size, ()))
                out.append(self.images[i].clone())
                self.images[i] = img
            else:
                out.append(img)
        return torch.stack(out)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.images": self.images.float(), f"{prefix}.count": torch.tensor([self.count])}

    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        images = state[f"{prefix}.images"]
        if images.shape != self.images.shape:
            raise UserError(
                f"checkpoint's {prefix} buffer has shape {tuple(images.shape)}, expected {tuple(self.images.shape)}"
            )
        self.images = images.clone()
        self.count = int(state[f"{prefix}.count"][0])


class CycleGAN(Translation):
    ema = ("G_ab", "G_ba")
    input_key = "image_a"

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.data.shards_a or not cfg.data.shards_b:
            raise UserError(
                "variant 'cyclegan' needs both domains: set data.shards_a and data.shards_b "
                "(e.g. builtin:digits-thin and builtin:digits-thick)"
            )
        c, r = cfg.data.channels, cfg.data.resolution
        self.models = {
            "G_ab": image2image.build_generator(cfg, c, c, norm="instance"),
            "G_ba": image2image.build_generator(cfg, c, c, norm="instance"),
            "D_a": image2image.build_discriminator(cfg, c, norm="instance"),
            "D_b": image2image.build_discriminator(cfg, c, norm="instance"),
        }
        m = self.models
        self.optimizers = {
            "G": self.optimizer(itertools.chain(m["G_ab"].parameters(), m["G_ba"].parameters()), cfg.train.lr_g),
            "D": self.optimizer(itertools.chain(m["D_a"].parameters(), m["D_b"].parameters()), cfg.train.lr_d),
        }
        self.pools = {
            "a": ImagePool(cfg.variant.pool_size, (c, r, r)),
            "b": ImagePool(cfg.variant.pool_size, (c, r, r)),
        }

    @staticmethod
    def data_streams(cfg):
        return {"a": ("data.shards_a", cfg.data.shards_a), "b": ("data.shards_b", cfg.data.shards_b)}

    def translate(self, gens, x):
        return gens["G_ab"](x)

    def generator_for(self, gens, direction):
        """translate() runs G_ab: for B -> A, G_ba in its place."""
        return gens if direction == "ab" else {"G_ab": gens["G_ba"]}

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {**self.pools["a"].state("pool_a"), **self.pools["b"].state("pool_b")}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in ("a", "b"):
            self.pools[k].load(state, f"pool_{k}")

    def train_step(self, batches: list[dict], ctx) -> dict[str, torch.Tensor]:
        m, v = self.models, self.cfg.variant
        device = batches[0]["image_a"].device
        keys = ("loss/g", "loss/cycle", "loss/identity", "loss/d", "d/real", "d/fake")
        stats = {k: torch.zeros((), device=device) for k in keys}
        n = len(batches)
        fakes = []
        self.optimizers["G"].zero_grad(set_to_none=True)
        with ctx.frozen(m["D_a"]) as d_a, ctx.frozen(m["D_b"]) as d_b:
            for mb in ctx.micro((m["G_ab"], m["G_ba"]), batches):
                a, b = mb["image_a"], mb["image_b"]
                fake_b, fake_a = m["G_ab"](a), m["G_ba"](b)
                adv = losses.g_loss("ls", d_b(fake_b)) + losses.g_loss("ls", d_a(fake_a))
                cycle = (m["G_ba"](fake_b) - a).abs().mean() + (m["G_ab"](fake_a) - b).abs().mean()
                loss = v.gan_weight * adv + v.cycle_weight * cycle
                if v.identity_weight > 0:
                    identity = (m["G_ab"](b) - b).abs().mean() + (m["G_ba"](a) - a).abs().mean()
                    loss = loss + v.identity_weight * v.cycle_weight * identity
                    stats["loss/identity"] += identity.detach() / n
                ctx.backward(loss)
                stats["loss/g"] += adv.detach() / n
                stats["loss/cycle"] += cycle.detach() / n
                fakes.append((fake_a.detach(), fake_b.detach()))
        ctx.step(self.optimizers["G"])

        self.optimizers["D"].zero_grad(set_to_none=True)
        for mb, (fake_a, fake_b) in zip(ctx.micro((m["D_a"], m["D_b"]), batches), fakes):
            real_a, real_b = m["D_a"](mb["image_a"]), m["D_b"](mb["image_b"])
            old_a, old_b = m["D_a"](self.pools["a"].query(fake_a)), m["D_b"](self.pools["b"].query(fake_b))
            loss = 0.5 * (losses.d_loss("ls", real_a, old_a) + losses.d_loss("ls", real_b, old_b))
            ctx.backward(loss)
            stats["loss/d"] += loss.detach() / n
            stats["d/real"] += 0.5 * (real_a.detach().float().mean() + real_b.detach().float().mean()) / n
            stats["d/fake"] += 0.5 * (old_a.detach().float().mean() + old_b.detach().float().mean()) / n
        ctx.step(self.optimizers["D"])
        return stats

    # -- previews and evaluation ----------------------------------------------------------
    def heldout(self) -> dict | None:
        from distgan.data import stream

        out = {}
        for k in ("a", "b"):
            src = stream.heldout_source(getattr(self.cfg.data, f"shards_{k}"), key=f"data.shards_{k}")
            if src is None:
                return None
            out[f"image_{k}"] = stream.read_all(
                src,
                resolution=self.cfg.data.resolution,
                channels=self.cfg.data.channels,
                options=stream.stream_options(self.cfg),
            )["image"]
        return out

    def preview(self, gens, batch):
        """Rows of a | G_ab(a) | G_ba(G_ab(a)) and b | G_ba(b) | G_ab(G_ba(b))."""
        a, b = batch["image_a"][:4].cpu(), batch["image_b"][:4].cpu()
        ab = self.run(gens, a)
        aba = self.run(self.generator_for(gens, "ba"), ab)
        ba = self.run(self.generator_for(gens, "ba"), b)
        bab = self.run(gens, ba)
        rows = torch.cat([torch.stack([a, ab, aba], 1), torch.stack([b, ba, bab], 1)])
        return rows.flatten(0, 1).float(), 3

    def evaluate(self, gens, heldout):
        """Cycle reconstruction error (mean |x - G(F(x))| in [0, 1] units) on held-out images of
        each domain, and how many translated images a classifier of the real domains (trained once
        on the training shards, cached) assigns to the target domain."""
        from distgan.metrics import domains

        a, b = heldout["image_a"], heldout["image_b"]
        ab, ba = self.run(gens, a), self.run(self.generator_for(gens, "ba"), b)
        aba, bab = self.run(self.generator_for(gens, "ba"), ab), self.run(gens, ba)
        clf = domains.DomainClassifier.for_config(self.cfg)
        return {
            "n_a": len(a),
            "n_b": len(b),
            "cycle_error_a": float((aba - a).abs().mean() / 2),
            "cycle_error_b": float((bab - b).abs().mean() / 2),
            "ab_classified_b": float((clf.predict(ab) == 1).float().mean()),
            "ba_classified_a": float((clf.predict(ba) == 0).float().mean()),
            "classifier_heldout_accuracy": clf.accuracy(a, b),
        }
