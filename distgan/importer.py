"""`distgan import --from r3gan SNAPSHOT.pkl --out RUN_DIR`: a network snapshot written by R3GAN's
training loop (brownvc/R3GAN, `network-snapshot-*.pkl`: a dict of G, D and G_ema as pickled modules of
its classes, `cur_nimg`, and both Adam states) becomes an ordinary distgan checkpoint, without
importing or running R3GAN's code: distgan/safepickle.py reads it with an allow-list, R3GAN's modules
come back as inert records, and their configuration is read off the stored tensors' shapes.

The checkpoint is RUN_DIR/checkpoints/step-00000000 with G, D, G_ema and both Adam states mapped onto
distgan's r3gan models (distgan/models/r3gan.py), a config whose model keys describe the imported
networks, and no data position: `distgan sample`/`eval` read it like any checkpoint, and
`distgan train --resume RUN_DIR/checkpoints/step-00000000 --out NEW data.shards=...` fine-tunes it
(the data streams and per-rank randomness start fresh from the seed, as a resume on another layout does).
"""

from __future__ import annotations

import copy
import hashlib
import re
import sys
from pathlib import Path

import torch

from distgan import checkpoint, config, files, safepickle
from distgan.errors import UserError
from distgan.models import r3gan
from distgan.safepickle import UnsafePickle

SOURCES = ("r3gan",)
# R3GAN's classes (training.networks, R3GAN.Networks/Resamplers/FusedOperators), torch's own modules
# (Conv2d, Linear, ModuleList, LeakyReLU) and dnnlib's EasyDict: records, never constructed
R3GAN_RECORDS = ("training.", "R3GAN.", "torch.nn.modules.", "dnnlib.", "torch_utils.")
# the template for the run's non-model settings (--preset overrides): (conditional, resolution) -> preset
PRESETS = {(True, 32): "r3gan-cifar", (True, 64): "r3gan-imagenet-64", (False, 64): "r3gan-ffhq-64"}
PRESETS_BY_KIND = {True: "r3gan-cifar", False: "r3gan-ffhq-256"}


def _tensor(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise UnsafePickle(f"the snapshot's module has no tensor '{key}': is it R3GAN's?")
    return state[key]


def _block_shape(state: dict, prefix: str) -> tuple[int, int, int]:
    """(width, expansion, cardinality) of an R3GAN ResidualBlock from its weights."""
    w1 = _tensor(state, prefix + "LinearLayer1.Layer.weight")
    w2 = _tensor(state, prefix + "LinearLayer2.Layer.weight")
    wide, width = w1.shape[0], w1.shape[1]
    if wide % width or tuple(w2.shape[2:]) != (3, 3):
        raise UnsafePickle(f"'{prefix}' is not an R3GAN block distgan reproduces (expansion or a 3x3 grouped conv)")
    return width, wide // width, wide // w2.shape[1]


def _stage_layers(net: safepickle.Record) -> list[list[safepickle.Record]]:
    return [safepickle.children(safepickle.child(stage, "Layers")) for stage in safepickle.children(net)]


def describe(G: safepickle.Record, D: safepickle.Record) -> dict:
    """The configuration of R3GAN's G and D read off the records: widths, cardinalities, blocks per
    stage (G's order), expansion, noise and label dimensions, fp32 stages, image channels, resolution."""
    g_net = safepickle.child(G, "Model")
    g_state = safepickle.state_dict(g_net)
    stages = _stage_layers(safepickle.child(g_net, "MainLayers"))
    widths, cards, blocks, expansions = [], [], [], set()
    for s, layers in enumerate(stages):
        if len(layers) < 2:
            raise UnsafePickle(f"G's stage {s} has no residual block; distgan's r3gan stages have at least one")
        width, expansion, card = _block_shape(g_state, f"MainLayers.{s}.Layers.1.")
        widths.append(width)
        cards.append(card)
        blocks.append(len(layers) - 1)
        expansions.add(expansion)
    if len(expansions) != 1:
        raise UnsafePickle(f"the snapshot's blocks use several expansion factors {sorted(expansions)}")
    to_image = _tensor(g_state, "AggregationLayer.Layer.weight")
    basis_in = _tensor(g_state, "MainLayers.0.Layers.0.LinearLayer.weight").shape[1]
    c_dim = int(G.get("c_dim") or 0)
    z_dim = int(G.get("z_dim") or basis_in)
    embed = g_state.get("EmbeddingLayer.weight")
    g_embed = 0 if embed is None else int(embed.shape[0])
    if basis_in != z_dim + g_embed:
        raise UnsafePickle(f"G's basis takes {basis_in} inputs, not z_dim {z_dim} + embedding {g_embed}")
    resolution = int(G.get("img_resolution") or 4 * 2 ** (len(stages) - 1))
    if resolution != 4 * 2 ** (len(stages) - 1):
        raise UnsafePickle(f"G has {len(stages)} stages but img_resolution {resolution}")
    fp32 = 0
    for stage in safepickle.children(safepickle.child(g_net, "MainLayers")):
        if stage.get("DataType", torch.float32) != torch.float32:
            break
        fp32 += 1
    d_net = safepickle.child(D, "Model")
    d_embed = safepickle.state_dict(d_net).get("EmbeddingLayer.weight")
    if (d_embed is None) != (embed is None) or (d_embed is not None and d_embed.shape[0] != widths[0]):
        raise UnsafePickle("D's class embedding does not match G's conditioning (or is not 4x4-width wide)")
    return {
        "widths": widths,
        "cardinalities": cards,
        "blocks": blocks,
        "expansion": expansions.pop(),
        "fp32_stages": fp32,
        "z_dim": z_dim,
        "num_classes": c_dim if embed is not None else 0,
        "embed_dim": g_embed,
        "channels": int(to_image.shape[0]),
        "resolution": resolution,
    }


# an R3GAN transition layer's tensors -> distgan's (under stages.S.transition.); None: the resampling
# filter, a buffer distgan rebuilds (and `mapped` checks)
TRANSITION = {
    "Basis": "basis",
    "Basis.weight": "basis.weight",
    "LinearLayer.weight": "linear.weight",
    "LinearLayer.Layer.weight": "conv.weight",
    "Resampler.Kernel": None,
}


G_OUTER = {"AggregationLayer.Layer.weight": "to_image.weight", "EmbeddingLayer.weight": "embed.weight"}
D_OUTER = {"ExtractionLayer.Layer.weight": "from_image.weight", "EmbeddingLayer.weight": "embed.weight"}


def _rename(name: str, outer: dict[str, str], transition_at) -> str | None:
    """An R3GAN state-dict name (under Model.) -> distgan's: `outer` for the layers outside the stages;
    in stage S, layer `transition_at(S)` is the transition (None: no such stage) and the others are the
    blocks in order. "?" for a name with no place."""
    if name in outer:
        return outer[name]
    m = re.fullmatch(r"MainLayers\.(\d+)\.Layers\.(\d+)\.(.+)", name)
    t = transition_at(int(m.group(1))) if m else None
    if t is None:
        return "?"
    s, k, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    if k == t:
        target = TRANSITION.get(rest, "?")
        return target if target in (None, "?") else f"stages.{s}.transition.{target}"
    return _block_name(f"stages.{s}.blocks.{k - 1 if k > t else k}.", rest)


def _g_name(name: str) -> str | None:
    """R3GAN G's name -> distgan's r3gan Generator's (each stage's transition comes first)."""
    return _rename(name, G_OUTER, lambda s: 0)


def _d_name(name: str, blocks: list[int]) -> str | None:
    """R3GAN D's name -> distgan's r3gan Discriminator's (`blocks` in D's order; the transition comes last)."""
    return _rename(name, D_OUTER, lambda s: blocks[s] if s < len(blocks) else None)


def _block_name(prefix: str, rest: str) -> str:
    m = re.fullmatch(r"LinearLayer([123])\.Layer\.weight", rest)
    if m:
        return f"{prefix}conv{m.group(1)}.weight"
    m = re.fullmatch(r"NonLinearity([12])\.Bias", rest)
    return f"{prefix}bias{m.group(1)}" if m else "?"


def mapped(record: safepickle.Record, model: torch.nn.Module, rename) -> tuple[dict, dict[str, str]]:
    """(distgan state dict, {R3GAN parameter name: distgan name}) of one pickled network. Every tensor
    must land on exactly one of `model`'s (same shape); the resampling filters must be [1, 2, 1]'s."""
    net = safepickle.child(record, "Model")
    ours = model.state_dict()
    out, names = {}, {}
    for name, t in safepickle.state_dict(net).items():
        target = rename(name)
        if target is None:
            if not torch.allclose(t.float(), r3gan.lowpass((1, 2, 1)), atol=1e-6):
                raise UnsafePickle(f"'{name}' is not the [1, 2, 1] resampling filter distgan's r3gan uses")
            continue
        if target not in ours or ours[target].shape != t.shape:
            raise UnsafePickle(f"the snapshot's '{name}' {tuple(t.shape)} has no place in distgan's r3gan model")
        out[target] = t.to(ours[target].dtype)
        names[f"Model.{name}"] = target
    missing = sorted(set(ours) - set(out))
    if missing:
        raise UnsafePickle(f"the snapshot lacks {', '.join(missing[:3])} of distgan's r3gan model")
    return out, names


def _adam_state(opt_state, record, model: torch.nn.Module, names: dict[str, str]) -> dict | None:
    """R3GAN's Adam state dict (parameters indexed in its module order) re-indexed for `model`'s order."""
    if not isinstance(opt_state, dict) or "state" not in opt_state or "param_groups" not in opt_state:
        return None
    theirs = safepickle.parameter_names(record)
    ours = [n for n, _ in model.named_parameters()]
    index = {n: i for i, n in enumerate(ours)}
    state = {}
    for i, s in opt_state["state"].items():
        if not isinstance(i, int) or i >= len(theirs) or theirs[i] not in names:
            raise UnsafePickle(f"the snapshot's optimizer state has an entry {i!r} for no known parameter")
        if not isinstance(s, dict) or not all(isinstance(v, torch.Tensor) for v in s.values()):
            raise UnsafePickle("the snapshot's optimizer state is not a dict of tensors")
        state[index[names[theirs[i]]]] = {k: v.clone() for k, v in s.items()}
    return state


def _config(info: dict, preset: str | None, overrides: list[str]) -> config.Config:
    conditional = info["num_classes"] > 0
    preset = preset or PRESETS.get((conditional, info["resolution"]), PRESETS_BY_KIND[conditional])
    model = [
        f"model.r3gan.widths={info['widths']}",
        f"model.r3gan.cardinalities={info['cardinalities']}",
        f"model.r3gan.blocks={info['blocks']}",
        f"model.r3gan.expansion={info['expansion']}",
        f"model.r3gan.fp32_stages={info['fp32_stages']}",
        f"model.r3gan.embed_dim={info['embed_dim']}",
        f"model.g.z_dim={info['z_dim']}",
        "model.g.arch=r3gan",
        "model.d.arch=r3gan",
        f"model.num_classes={info['num_classes']}",
        f"data.resolution={info['resolution']}",
        f"data.channels={info['channels']}",
    ]
    return config.load_config(preset, None, [o.replace(" ", "") for o in model] + list(overrides))


def import_r3gan(path: str, out: str, preset: str | None = None, overrides: list[str] = ()) -> Path:
    """Import R3GAN snapshot `path` into run directory `out` (see the module docstring); the step folder."""
    from distgan import variants

    src = Path(path)
    run_dir = Path(out)
    if checkpoint.list_steps(run_dir):
        raise UserError(f"'{run_dir}' already has checkpoints; import into a new --out")
    sha = hashlib.sha256()
    data = safepickle.load(str(src), R3GAN_RECORDS, digest=sha)
    if not isinstance(data, dict) or not all(k in data for k in ("G", "D", "G_ema")):
        raise UnsafePickle(f"'{src}' is not an R3GAN network snapshot (a dict with G, D and G_ema)")
    info = describe(data["G"], data["D"])
    cfg = _config(info, preset, overrides)
    variant = variants.get(cfg.variant.name)(cfg)
    if variant.num_classes != info["num_classes"]:
        theirs = f"conditional on {info['num_classes']} classes" if info["num_classes"] else "unconditional"
        ours = f"{variant.num_classes} classes" if variant.num_classes else "no labels"
        raise UserError(
            f"the snapshot's networks are {theirs}, but variant.name={cfg.variant.name} trains with {ours}; "
            "pass a --preset (or variant.name=...) that matches"
        )
    G, D = variant.models["G"], variant.models["D"]
    d_blocks = info["blocks"][::-1]
    g_state, g_names = mapped(data["G"], G, _g_name)
    ema_state, _ = mapped(data["G_ema"], G, _g_name)
    d_state, d_names = mapped(data["D"], D, lambda n: _d_name(n, d_blocks))
    G.load_state_dict(g_state)
    D.load_state_dict(d_state)
    G_ema = copy.deepcopy(G)
    G_ema.load_state_dict(ema_state)
    optimizers = {}
    for name, model, record, names in (("G", G, data["G"], g_names), ("D", D, data["D"], d_names)):
        opt = variant.optimizers[name]
        state = _adam_state(data.get(f"{name}_opt_state"), record, model, names)
        if state is None:
            print(f"note: the snapshot has no {name} optimizer state; Adam starts fresh", file=sys.stderr)
        else:
            sd = opt.state_dict()
            sd["state"] = state
            try:
                opt.load_state_dict(sd)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UnsafePickle(f"the snapshot's {name} optimizer state does not fit: {exc}") from None
        optimizers[name] = opt
    cur_nimg = data.get("cur_nimg")
    meta = checkpoint.run_meta(config.to_dict(cfg), [], cfg.variant.name, 0, 0, 0)
    meta["imported"] = {
        "from": "r3gan",
        "file": str(src.resolve()),
        "sha256": sha.hexdigest(),
        "cur_nimg": int(cur_nimg) if isinstance(cur_nimg, int) else None,
    }
    snap = checkpoint.snapshot({"G": G, "D": D, "G_ema": G_ema}, optimizers, {})
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / "config.yaml", config.to_yaml(cfg))
    return checkpoint.write(run_dir, 0, snap, meta, keep_last=1)
