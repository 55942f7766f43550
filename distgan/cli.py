"""`distgan` command line: shards | train | sample | eval | stats | config | presets.

User errors (bad config, path, shard or checkpoint) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distgan.errors import RunFailed, UserError, user_message


def _shards(args: argparse.Namespace) -> int:
    from distgan.data import builtin, shards

    kw = dict(
        maxcount=args.maxcount, maxsize=args.maxsize, overwrite=args.overwrite, fmt=args.format, quality=args.quality
    )
    if args.prefix:
        kw["prefix"] = args.prefix
    if args.encode:
        return _encode(args)
    stray = [
        flag
        for flag, on in (("--flips", args.flips), ("--keep-images", args.keep_images), ("--posterior", args.posterior))
        if on
    ]
    if stray:
        raise UserError(f"{', '.join(stray)}: for latent shards only (with --encode VAE)")
    if args.shards:
        raise UserError("--shards (image shards as the source) goes with --encode VAE")
    if args.builtin in builtin.LATENT_BUILTINS:
        raise UserError(
            f"builtin '{args.builtin}' is a latent set: train on data.shards=builtin:{args.builtin} (made in the "
            "cache), or encode your own with --encode VAE"
        )
    if args.builtin:
        manifest = shards.write_builtin(args.builtin, args.out, **kw)
    elif args.images:
        manifest = shards.write_folder(args.images, args.out, resize=args.resize, rgb=args.rgb, **kw)
    elif args.pairs:
        manifest = shards.write_pairs(
            *args.pairs, args.out, resize=args.resize, rgb=args.rgb, input_rgb=args.input_rgb, **kw
        )
    else:
        x, y, classes = shards.load_npz(args.npz)
        manifest = shards.write_arrays(x, y, classes, args.out, source=f"npz:{args.npz}", **kw)
    print(
        f"wrote {manifest['count']} samples of shape {tuple(manifest['image_shape'])} in "
        f"{len(manifest['shards'])} shards: {os.path.join(args.out, manifest['pattern'])}"
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    """`distgan shards --encode VAE`: latent shards (distgan/data/latents.py)."""
    from distgan import vae
    from distgan.data import latents, stream

    if args.pairs or args.npz:
        raise UserError("--encode takes --images, --builtin or --shards as its source")
    if not args.resize:
        raise UserError("--encode needs --resize N: the size of the (square) images the VAE encodes")
    if args.images:
        where, source = f"images:{args.images}", latents.folder_samples(args.images, args.resize)
    elif args.builtin:
        where, source = f"builtin:{args.builtin}", latents.builtin_samples(args.builtin, args.resize)
    else:
        channels = vae.identity(args.encode)["image_channels"]
        where, source = args.shards, stream.image_samples(args.shards, args.resize, channels)
    manifest = latents.encode(
        args.encode,
        source,
        where,
        args.out,
        resolution=args.resize,
        maxcount=args.maxcount,
        batch=args.batch,
        flips=args.flips,
        keep_images=args.keep_images,
        posterior=args.posterior,
        overwrite=args.overwrite,
    )
    h, w, c = manifest["image_shape"]
    print(
        f"wrote {manifest['count']} latents of shape ({c}, {h}, {w}) in {len(manifest['shards'])} shards: "
        f"{os.path.join(args.out, manifest['pattern'])}; train with data.kind=latents data.resolution={h} "
        f"data.channels={c} model.vae={args.encode}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from distgan import config, trainer
    from distgan import run as run_state

    out = (
        Path(args.out)
        if args.out
        else Path("runs") / (args.preset or (Path(args.config).stem if args.config else config.DEFAULT_PRESET))
    )
    cfg = run_state.resume_config(
        out, args.resume, args.preset, args.config, args.overrides, trust=args.trust_checkpoint_config
    )
    code = trainer.train(cfg, out, resume=args.resume)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and closed by now (checkpoints fsynced, logs closed, loader workers
        # stopped). Skip interpreter teardown: there, a gloo rank of a finished run occasionally
        # aborted ("terminate called without an active exception", a C++ thread destroyed while
        # joinable), turning a successful run into a failed launch.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


LIVE_HELP = "use the trained generator itself instead of its EMA copy (train.ema_beta)"
DRS_HELP = (
    "keep samples by discriminator rejection sampling (Azadi et al. 2019) with the checkpoint's D: accept x "
    "with probability exp(D(x) - max D); logistic-loss gan/unrolled models"
)


def _load_generators(args: argparse.Namespace, need_data: bool = False):
    """(checkpoint, config, variant, {name: its EMA generator (the trained one itself with --live) on
    the device, in eval mode}) of --ckpt. The stored config's shard locations and files are used
    only as distgan/trust.py allows: `need_data` says that this command reads the training shards."""
    import torch

    from distgan import checkpoint, config, trust, variants

    ckpt = checkpoint.load(args.ckpt, only_models=True)
    stored = ckpt.meta["config"]
    given = trust.override_keys(args.overrides)
    allowed = set(trust.SHARD_KEYS + trust.FILE_KEYS) | {"data.on_error"}  # how this command reads the shards
    if given - allowed:
        raise UserError(
            f"`distgan {args.command}` takes only {', '.join(sorted(allowed))} as key=value "
            f"(the model comes from the checkpoint); got {', '.join(sorted(given - allowed))}"
        )
    data, notes = trust.checkpoint_config(
        stored,
        given=given,
        needed=[*(trust.stream_keys(stored) if need_data else ()), *trust.decoder_keys(stored)],
        trust=args.trust_checkpoint_config,
        where=str(ckpt.path),
    )
    trust.say(notes)
    if args.overrides:
        cfg = config.load_config(None, None, args.overrides, base=data)
        trust.say(trust.differences(stored, cfg, sorted(given)))
    else:
        cfg = config.from_dict(data)
    variant = variants.get(cfg.variant.name)(cfg)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gens = {}
    for name in variant.ema:
        G, key = variant.models[name], name if args.live else f"{name}_ema"
        checkpoint.load_model(G, ckpt.model_state(key), f"checkpoint '{ckpt.path}' model '{key}'")
        gens[name] = G.to(device).eval()
    if getattr(args, "standing_stats", 0):
        _standing_stats(args, cfg, variant, gens[variant.ema[0]])
    return ckpt, cfg, variant, gens


def _standing_stats(args: argparse.Namespace, cfg, variant, G) -> None:
    """--standing-stats N: the generator's BatchNorm statistics recomputed from N batches of 64 of its
    own samples (noise from seed + 1, so the samples drawn afterwards use the same noise as without)."""
    import torch

    from distgan import models

    if args.standing_stats < 0:
        raise UserError(f"--standing-stats must be >= 0; got {args.standing_stats}")
    if variant.image_to_image:
        raise UserError(
            f"--standing-stats applies to noise-driven generators, not to image-to-image '{cfg.variant.name}'"
        )
    gen = torch.Generator().manual_seed(args.seed + 1)
    if not models.standing_stats(G, lambda: variant.sample(G, 64, generator=gen), args.standing_stats):
        raise UserError(f"--standing-stats: this generator ({cfg.model.g.arch}) has no BatchNorm statistics")


def _load_generator(args: argparse.Namespace, need_data: bool = False):
    """(checkpoint, config, variant, its (first) generator on the device, in eval mode): the EMA copy,
    or the trained G with --live."""
    ckpt, cfg, variant, gens = _load_generators(args, need_data)
    return ckpt, cfg, variant, gens[variant.ema[0]]


def _translate(args: argparse.Namespace) -> int:
    """`distgan sample --input`: translate or upscale the user's images with an image-to-image model."""
    from distgan import images

    ckpt, cfg, variant, gens = _load_generators(args)
    if not variant.image_to_image:
        from distgan import variants

        names = ", ".join(n for n in variants.REGISTRY if variants.get(n).image_to_image)
        raise UserError(
            f"--input needs an image-to-image model ({names}); this checkpoint's variant is '{cfg.variant.name}'"
        )
    src = Path(args.input)
    if src.is_dir():
        files = sorted(f for f in src.iterdir() if f.suffix.lower() in images.IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"--input folder '{src}' holds no images")
        out_dir = Path(args.out)
        if out_dir.suffix:
            raise UserError(f"--input is a folder, so --out must be a folder too; got '{args.out}'")
        targets = [out_dir / (f.stem + ".png") for f in files]
    elif src.is_file():
        if Path(args.out).suffix.lower() != ".png":
            raise UserError(f"--out must end in .png for a single --input image; got '{args.out}'")
        files, targets = [src], [Path(args.out)]
    else:
        raise UserError(f"--input '{src}' does not exist")
    from tqdm import tqdm

    for f, target in zip(tqdm(files, desc="translate", disable=len(files) < 4), targets):
        x = images.load_image(f, variant.input_channels())
        y = variant.translate_image(gens, x, direction=args.direction)
        images.save_png(target, images.to_uint8(y)[0])
    where = targets[0] if len(targets) == 1 else targets[0].parent
    print(f"wrote {len(targets)} image(s) from {ckpt.path} (step {ckpt.step}) to {where}")
    return 0


def _draw(variant, G, total: int, seed: int, labels=None, D=None):
    """`total` samples in chunks of 1024, with a progress bar for big requests; with `D`, kept by
    discriminator rejection sampling (distgan.sampling), and its statistics."""
    import torch
    from tqdm import tqdm

    from distgan import evaluation

    with tqdm(total=total, desc="sample", disable=total <= 1024 and D is None) as bar:
        if D is not None:
            from distgan import sampling

            return sampling.rejection_sample(variant, G, D, total, torch.Generator().manual_seed(seed), bar=bar)
        return evaluation.draw(variant, G, total, seed, labels=labels, bar=bar), {}


def _load_discriminator(ckpt, cfg, variant, G, args: argparse.Namespace):
    """The checkpoint's D, on G's device in eval mode, for --drs; with --drs-calibrate, trained further
    against the frozen G first (distgan.sampling.calibrate). Returns (D, its report entries)."""
    from distgan import checkpoint, sampling

    if args.drs_calibrate and not args.drs:
        raise UserError("--drs-calibrate trains the discriminator for --drs; add --drs")
    if not args.drs:
        return None, {}
    if args.drs_calibrate < 0 or not args.drs_lr > 0:
        raise UserError(f"--drs-calibrate must be >= 0 and --drs-lr > 0; got {args.drs_calibrate} and {args.drs_lr}")
    sampling.check_supported(cfg)
    D = variant.models["D"]
    checkpoint.load_model(D, ckpt.model_state("D"), f"checkpoint '{ckpt.path}' model 'D'")
    D = D.to(next(G.parameters()).device)
    if not args.drs_calibrate:
        return D.eval(), {}
    import torch
    from tqdm import tqdm

    from distgan.data import stream

    source = stream.resolve(cfg.data.shards)
    ds = stream.from_config(cfg, source.urls, seed=args.seed)
    real = (batch["image"] for batch in stream.make_loader(ds, num_workers=0))
    gen = torch.Generator().manual_seed(args.seed + 1)  # not the sampling seed: fresh draws
    with tqdm(total=args.drs_calibrate, desc="calibrate D") as bar:
        D, stats = sampling.calibrate(
            variant, G, D, real, args.drs_calibrate, args.drs_lr, gen, betas=(cfg.train.beta1, cfg.train.beta2), bar=bar
        )
    return D, {"drs_" + k: v for k, v in stats.items()}


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from distgan import files, images

    if args.input:
        if args.drs or args.drs_calibrate:
            raise UserError("--drs applies to unconditional gan/unrolled models, not to --input translation")
        return _translate(args)
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".png", ".npy"):
        raise UserError(f"--out must end in .png (a grid) or .npy (the raw array); got '{args.out}'")
    if args.n < 1:
        raise UserError(f"--n must be >= 1; got {args.n}")
    if args.zoom < 0:
        raise UserError(f"--zoom must be >= 1 (or 0: auto); got {args.zoom}")
    ckpt, cfg, variant, G = _load_generator(args, need_data=bool(args.drs and args.drs_calibrate))
    labels, nrow = _sample_labels(args, cfg)
    total = len(labels) if labels is not None else args.n
    D, _ = _load_discriminator(ckpt, cfg, variant, G, args)
    x, drs = _draw(variant, G, total, args.seed, labels, D)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        files.write_atomic(args.out, lambda fh: np.save(fh, x.numpy().astype(np.float32)))
    elif x.ndim == 2:  # points: a scatter over the true centres, when the data has them
        mixture = (_manifest(cfg) or {}).get("mixture") or {}
        images.save_png(args.out, images.scatter(x, mixture.get("centres")))
    else:
        # nearest-neighbour, so that every image is at least 64 pixels wide (16x16 digits: 4x)
        zoom = args.zoom or max(1, -(-64 // x.shape[-1]))
        images.save_png(args.out, images.make_grid(x, nrow=nrow, scale=zoom))
    kept = f" (discriminator rejection sampling kept {drs['accept_rate']:.1%} of {drs['drawn']} draws)" if drs else ""
    print(f"wrote {total} samples from {ckpt.path} (step {ckpt.step}) to {args.out}{kept}")
    return 0


def _manifest(cfg) -> dict | None:
    from distgan.data import stream

    try:
        return stream.resolve(cfg.data.shards, progress=False).manifest
    except UserError:
        return None


def _eval(args: argparse.Namespace) -> int:
    if args.watch:
        return _eval_watch(args)
    result = _evaluate(args)
    return _report(result, args.json) if result is not None else 0


def _eval_watch(args: argparse.Namespace) -> int:
    """`distgan eval --watch`: every checkpoint of run --ckpt evaluated as it appears, in this process, so
    a long evaluation (fid50k) never stalls training. One JSON line per step in RUN/eval/watch.jsonl
    (--json: another file); steps already there are not evaluated again, so a stopped watcher goes on
    where it was. It ends once the run's last step (train.steps of RUN/config.yaml) is evaluated."""
    import json
    import time

    from omegaconf import OmegaConf

    from distgan import checkpoint, metrics

    run = Path(args.ckpt)
    if not run.is_dir() or checkpoint.STEP_DIR.match(run.name) or (run / "state.safetensors").exists():
        raise UserError(f"--watch takes a run directory (RUN, with RUN/checkpoints/ to come); got '{args.ckpt}'")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--watch runs in one process; launch it without accelerate launch")
    if args.poll <= 0:
        raise UserError(f"--poll must be > 0 seconds; got {args.poll}")
    log = Path(args.json) if args.json else run / "eval" / "watch.jsonl"
    done: set[int] = set()
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                done.add(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"'{log}' is not a --watch log (a line without a step: {line[:80]!r})") from None
    log.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        final = None
        if (run / "config.yaml").exists():
            final = OmegaConf.select(OmegaConf.load(run / "config.yaml"), "train.steps")
        for folder in checkpoint.list_steps(run):
            step = int(checkpoint.STEP_DIR.match(folder.name).group(1))
            if step in done:
                continue
            args.ckpt = str(folder)
            try:
                result = _evaluate(args)
            except (UserError, OSError) as exc:
                if folder.exists():
                    raise
                result = {"step": step, "skipped": f"deleted before it was evaluated ({str(exc)[:120]})"}
            with open(log, "a") as f:  # one line per step: a reader never sees half a result
                f.write(json.dumps(result) + "\n")
                f.flush()
                os.fsync(f.fileno())
            done.add(step)
            print(f"eval --watch: {json.dumps(metrics.scalars(result, ''))}", flush=True)
        if final is not None and done and max(done) >= final:
            print(f"eval --watch: step {max(done)} of {final} evaluated; results in {log}")
            return 0
        if not waited:
            print(
                f"eval --watch: waiting for new checkpoints in {run / 'checkpoints'} (Ctrl-C to stop)", file=sys.stderr
            )
            waited = True
        time.sleep(args.poll)


def _evaluate(args: argparse.Namespace) -> dict | None:
    """`distgan eval` of one checkpoint: its results (None on ranks other than the main one)."""
    from tqdm import tqdm

    from distgan import evaluation, metrics
    from distgan.metrics import inception
    from distgan.metrics import standard as standard_metrics

    inception_file = inception.resolve_path(args.inception)
    if args.n is None:
        args.n = 50_000 if inception_file else 2500  # fid50k with the standard network
    if args.n < 2:
        raise UserError(f"--n must be >= 2; got {args.n}")
    if args.ref and not inception_file:
        raise UserError("--ref holds Inception statistics; give the network too. " + inception.missing_message())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_rank = True
    if world > 1:  # under `accelerate launch`: the standard metrics' work is split over the ranks
        import torch
        from accelerate import Accelerator

        acc = Accelerator(cpu=not torch.cuda.is_available())
        args.device, main_rank = str(acc.device), acc.is_main_process
    # the training shards are read for the reference statistics, unless --ref gives them
    loaded = _load_generators(args, need_data=not args.heldout and not args.ref)
    if loaded[2].image_to_image:  # measured on held-out inputs
        if args.drs or args.drs_calibrate:
            raise UserError("--drs applies to unconditional gan/unrolled models, not image-to-image ones")
        return _eval_translation(args, *loaded)
    ckpt, cfg, variant, gens = loaded
    G = gens[variant.ema[0]]
    manifest = _manifest(cfg)
    usable = metrics.applicable(cfg, manifest, args.features, inception=bool(inception_file))
    names = args.metrics.split(",") if args.metrics else usable
    metrics.check(names, usable, cfg)
    if inception_file and (args.drs or args.drs_calibrate) and set(names) & set(metrics.STANDARD):
        raise UserError(
            "--drs with the Inception metrics is not supported; measure --drs samples with the other "
            "metrics, or the plain generator with --inception"
        )
    result = {"checkpoint": str(ckpt.path), "step": ckpt.step, "n": args.n}
    standard, rest = evaluation.split_names(names, bool(inception_file))
    split = standard_metrics.Split.current(chunk=args.chunk)
    feature_net = None
    if standard:
        if args.chunk < 1:
            raise UserError(f"--chunk must be >= 1; got {args.chunk}")
        feature_net = evaluation.Inception.load(
            cfg, inception_file, next(G.parameters()).device, split, ref=args.ref, limit=args.ref_n
        )
        result.update(feature_net.describe(split))
    elif not args.features and {"fid", "kid"} & set(names):
        result["inception"] = "not given, so fid/kid are in the digits features below. " + inception.missing_message()
        print(f"distgan eval: note: {result['inception']}", file=sys.stderr)
    reference = None
    if args.heldout:
        if "swd" not in rest:
            raise UserError(
                "--heldout gives the reference images of swd (or an image-to-image model's held-out "
                "inputs); add swd to --metrics"
            )
        from distgan.data import stream

        src = stream.resolve(args.heldout, progress=False, key="--heldout")
        reference = stream.read_all(
            src, resolution=cfg.data.resolution, channels=cfg.data.channels, options=stream.stream_options(cfg)
        )["image"]
    x = None
    if rest and main_rank:
        D, calibrated = _load_discriminator(ckpt, cfg, variant, G, args)
        x, drs = _draw(variant, G, args.n, args.seed, D=D)
        result.update(calibrated)
        if drs:
            result.update({f"drs_{k}": v for k, v in drs.items()})
    with tqdm(total=args.n, desc="generated features", unit="img", disable=not standard or split.rank != 0) as bar:
        result.update(
            evaluation.measure(
                cfg,
                variant,
                G,
                names,
                n=args.n,
                seed=args.seed,
                split=split,
                manifest=manifest,
                inception=feature_net,
                main=main_rank,
                samples=x,
                features=args.features,
                reference=reference,
                bar=bar,
            )
        )
    return result if main_rank else None


def _stats(args: argparse.Namespace) -> int:
    """`distgan stats`: a shard set's Inception reference statistics, cached (and written to --out)."""
    import torch

    from distgan.data import stream
    from distgan.metrics import inception, standard

    path = inception.resolve_path(args.inception)
    if not path:
        raise UserError(inception.missing_message())
    if args.n < 0 or args.chunk < 1:
        raise UserError(f"--n must be >= 0 (0: all) and --chunk >= 1; got {args.n} and {args.chunk}")
    resolution, channels = args.resolution, args.channels
    shape = (stream.resolve(args.shards, progress=False, key="--shards").manifest or {}).get("image_shape")
    if resolution is None or channels is None:
        if not shape:
            raise UserError(
                "--resolution and --channels are needed for shards without a manifest.json "
                "(use the training run's data.resolution and data.channels)"
            )
        resolution = resolution or int(shape[0])
        channels = channels or int(shape[2] if len(shape) > 2 else 1)
    net = inception.FeatureNet(path, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = {"image_key": args.image_key, "crop": args.crop, "on_error": args.on_error}  # as data.* of a run
    stats, origin = standard.reference_stats(
        args.shards,
        resolution=resolution,
        channels=channels,
        net=net,
        split=standard.Split(chunk=args.chunk),
        limit=args.n,
        key="--shards",
        options=options,
    )
    print(
        f"reference statistics of {stats.n} images of {args.shards} at {resolution}x{resolution}x{channels}, "
        f"{net.describe()}: {origin}"
    )
    if args.out:
        stats.save(args.out)
        print(f"wrote {args.out}")
    return 0


def _eval_translation(args: argparse.Namespace, ckpt, cfg, variant, gens) -> dict:
    """`distgan eval` of an image-to-image model: its own measures on the held-out set."""
    from distgan.data import stream

    if args.metrics or args.features:
        raise UserError(
            f"--metrics/--features do not apply to variant '{cfg.variant.name}': it is measured on "
            "held-out inputs (PSNR/SSIM, or cycle error and a domain classifier for cyclegan)"
        )
    if args.heldout:
        domains = len(variant.data_streams(cfg))
        if domains > 1:
            raise UserError(
                f"--heldout takes one shard set; {cfg.variant.name}'s held-out sets come from its {domains} domains"
            )
        src = stream.resolve(args.heldout, progress=False, key="--heldout")
        heldout = stream.read_all(
            src,
            resolution=cfg.data.resolution,
            channels=cfg.data.channels,
            options=stream.stream_options(cfg),
            fields=variant.fields(),
        )
    else:
        heldout = variant.heldout()
        if heldout is None:
            raise UserError(
                f"the shards of this run ({cfg.data.shards}) name no held-out set; give one with "
                "--heldout SHARDS (the same format as the training shards)"
            )
    return {"checkpoint": str(ckpt.path), "step": ckpt.step, **variant.evaluate(gens, heldout)}


def _report(result: dict, json_path: str | None) -> int:
    """Print eval results, one per line, and write them to `json_path` when given."""
    import json

    for k, v in result.items():
        print(f"{k:>28}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if json_path:
        from distgan import files

        files.write_text(json_path, json.dumps(result, indent=2) + "\n")
    return 0


def _sample_labels(args: argparse.Namespace, cfg):
    """(labels for --class, grid row length) for `distgan sample`."""
    import torch

    if args.cls is None:
        return None, None
    k = cfg.model.num_classes
    if k < 1:
        raise UserError(f"--class needs a conditional model; this checkpoint's variant is '{cfg.variant.name}'")
    if args.cls == "all":
        return torch.arange(k).repeat_interleave(args.n), args.n
    try:
        c = int(args.cls)
    except ValueError:
        raise UserError(f"--class must be a class index or 'all'; got '{args.cls}'") from None
    if not 0 <= c < k:
        raise UserError(f"--class must be in 0..{k - 1} for this model; got {c}")
    return torch.full((args.n,), c), None


def _config(args: argparse.Namespace) -> int:
    """Print the resolved config (preset or file, plus overrides) as YAML, or with --doc the reference."""
    from distgan import config

    if args.params:
        return _params(args)
    if args.doc or args.flags:
        if args.preset or args.config or args.overrides or (args.doc and args.flags):
            raise UserError("--doc and --flags print a reference; they take no preset, file, overrides or each other")
        print(config.reference_markdown() if args.doc else flags_markdown(), end="")
        return 0
    print(config.to_yaml(config.load_config(args.preset, args.config, args.overrides)), end="")
    return 0


def _import(args: argparse.Namespace) -> int:
    """`distgan import --from r3gan SNAPSHOT --out RUN_DIR`: an ordinary distgan checkpoint of its networks."""
    from distgan import importer

    folder = importer.import_r3gan(args.snapshot, args.out, args.preset, args.overrides)
    print(f"imported {args.snapshot} -> {folder}")
    print(f"sample:    distgan sample --ckpt {folder} --out samples.png")
    print(f"fine-tune: distgan train --resume {folder} --out RUN data.shards=YOUR_SHARDS")
    return 0


def _params(args: argparse.Namespace) -> int:
    """`distgan config --params`: each model's parameter count under the resolved config."""
    import torch

    from distgan import config, variants
    from distgan.models import r3gan

    cfg = config.load_config(args.preset, args.config, args.overrides)
    with torch.device("meta"):  # shapes only: a 100 M-parameter template takes no memory or time
        variant = variants.get(cfg.variant.name)(cfg)
        flops = {}
        if cfg.model.g.arch == "r3gan" and cfg.model.d.arch == "r3gan":  # counted from the layers' shapes
            y = variant.labels(2, "meta")
            flops["G"] = r3gan.forward_flops(
                variant.models["G"], variant.noise(2, "meta"), *([y] if y is not None else [])
            )
            x = torch.empty(2, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
            flops["D"] = r3gan.forward_flops(variant.models["D"], x, *([y] if y is not None else []))
    for name, model in variant.models.items():
        line = f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters"
        if name in flops:
            line += f", {flops[name] / 1e9:.2f} GFLOP per image forward"
        print(line)
    return 0


def _presets(_args: argparse.Namespace) -> int:
    from distgan import config

    for name in config.list_presets():
        print(name + ("  (default)" if name == config.DEFAULT_PRESET else ""))
    return 0


STANDING_HELP = (
    "recompute the generator's BatchNorm statistics (the EMA copy's, or --live's) from this many batches "
    "of 64 of its own samples (BigGAN's standing statistics) before drawing; the default 0 keeps the "
    "statistics copied from the live G"
)


def _standing_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--standing-stats", type=int, default=0, metavar="BATCHES", help=STANDING_HELP)


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drs-calibrate",
        type=int,
        default=0,
        metavar="STEPS",
        help="with --drs: first train the checkpoint's D this many more steps against the frozen "
        "generator, on the training shards (logistic loss, no penalty, weight average), so that it "
        "estimates log p_data/p_G for this generator (default 0: D as trained)",
    )
    p.add_argument("--drs-lr", type=float, default=2e-4, help="Adam learning rate of --drs-calibrate (default 2e-4)")


TRUST_HELP = (
    "take shard locations (pipe: commands, URLs, paths), files and W&B destinations from the checkpoint's "
    "stored config instead of refusing them: only for a checkpoint whose author you trust, since a pipe: "
    "spec runs a shell command on this machine (see docs/security.md)"
)


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint-config", action="store_true", help=TRUST_HELP)


def _stored_args(p: argparse.ArgumentParser) -> None:
    """sample/eval: where the training data and files are, since those never come from a checkpoint."""
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="the checkpoint's data.shards (or data.shards_a/_b, variant.vgg_weights), when this command "
        "reads them: they are never taken from the checkpoint itself",
    )
    _trust_arg(p)


FLAGS_HEADING = "## Every flag"


def flags_markdown() -> str:
    """The end of docs/usage.md: every subcommand's flags with their help, from the parser itself
    (`distgan config --flags`; a test fails when the file and the parser differ)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [f"{FLAGS_HEADING}\n\nGenerated from the parser by `distgan config --flags`.\n"]
    for name, command in sub.choices.items():
        out.append(f"\n### distgan {name}\n\n| flag | meaning |\n|---|---|\n")
        for action in command._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "--help" in action.option_strings:
                continue
            flag = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.metavar or (action.nargs != 0 and action.choices is None and action.const is None):
                metavar = action.metavar or action.dest.upper()
                flag += " " + (" ".join(metavar) if isinstance(metavar, tuple) else metavar)
            if action.choices:
                flag += " " + "\\|".join(map(str, action.choices))
            text = (action.help or "").replace("|", "\\|").replace("%%", "%")
            if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
                text += f" (default {action.default})"
            out.append(f"| {flag} | {text} |\n")
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distgan", description="Distributed GAN trainer.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shards", help="write webdataset shards (KEY.png + KEY.cls + KEY.json) and a manifest.json")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--builtin",
        help="embedded data: digits (sklearn, 1797 8x8), faces (skimage lfw_subset), or the 2-D mixtures ring "
        "(8 modes) and grid (25 modes), 100k points each, or stacked-digits (60k RGB images of 3 digits: "
        "1000 modes); image-to-image sets with a held-out part in OUT/heldout: edges2photos (paired Canny "
        "edges -> 64x64 photo patches), photos-hr (96x96 HR photo patches, for SR), digits-thin and "
        "digits-thick (cyclegan's two unpaired domains, 32x32)",
    )
    src.add_argument(
        "--images", help="an image folder: its subfolders are the classes, or a flat folder of unlabelled images"
    )
    src.add_argument(
        "--pairs",
        nargs=2,
        metavar=("INPUT_DIR", "TARGET_DIR"),
        help="paired image-to-image data (pix2pix): images that pair up by name across the two folders, "
        "written as KEY.input.png + KEY.target.png",
    )
    src.add_argument("--npz", help="an .npz with arrays x (N,H,W[,C]) and optional y (N,)")
    src.add_argument("--shards", help="--encode: image shards to encode (a folder, brace pattern, URL or builtin:NAME)")
    s.add_argument(
        "--encode",
        metavar="VAE",
        help="write latent shards instead: the images encoded by this VAE (a diffusers AutoencoderKL folder, "
        "safetensors), for data.kind=latents (docs/data.md)",
    )
    s.add_argument("--flips", action="store_true", help="--encode: also encode each image's mirror, as its own sample")
    s.add_argument(
        "--keep-images",
        action="store_true",
        help="--encode: store each encoded image beside its latent (KEY.png), for model.align.encoder",
    )
    s.add_argument(
        "--posterior",
        action="store_true",
        help="--encode: also store each latent's posterior std (KEY.std.npy), to train with data.posterior=true",
    )
    s.add_argument("--batch", type=int, default=64, help="--encode: images per VAE call (default 64)")
    s.add_argument("--out", required=True, help="output folder for the shards")
    s.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--maxsize", type=float, default=256e6, help="bytes per shard (default 256e6)")
    s.add_argument("--prefix", help="shard file prefix (default: the builtin's name, else 'shard')")
    s.add_argument(
        "--resize", type=int, help="--images, --pairs, --encode: center-crop and resize every image to N x N"
    )
    s.add_argument("--rgb", action="store_true", help="--images, --pairs (targets): store RGB instead of grayscale")
    s.add_argument("--input-rgb", action="store_true", help="--pairs: store the inputs as RGB too")
    s.add_argument(
        "--format",
        choices=("png", "jpg", "webp"),
        default="png",
        help="image encoding: png (lossless, the default), jpg or webp (lossy, 5-10x smaller for photos)",
    )
    s.add_argument("--quality", type=int, default=95, help="--format jpg/webp: quality 1..100 (default 95)")
    s.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    s.set_defaults(func=_shards)

    t = sub.add_parser("train", help="train a GAN (run under `accelerate launch` for several processes)")
    which = t.add_mutually_exclusive_group()
    which.add_argument("--preset", help="a preset shipped with distgan (see `distgan presets`; default digits-dcgan)")
    which.add_argument("--config", help="a YAML config file")
    t.add_argument("--out", help="run directory (default runs/<preset>)")
    t.add_argument("--resume", help="'auto' (latest checkpoint in --out, if any) or a checkpoint/run path")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")
    _trust_arg(t)
    t.set_defaults(func=_train)

    m = sub.add_parser("sample", help="sample images from a checkpoint's EMA generator, or translate images")
    m.add_argument("--ckpt", required=True, help="a checkpoint step folder, or a run directory (its latest)")
    m.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    m.add_argument(
        "--out",
        required=True,
        help="FILE.png (a grid) or FILE.npy ((N,C,H,W) float32 in [-1, 1]); "
        "with --input, the translated image (or folder)",
    )
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--class",
        dest="cls",
        help="conditional models: a class index (every sample of that class) or 'all' (a row per class, --n per row)",
    )
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    m.add_argument(
        "--input",
        help="image-to-image models: an image or a folder of images to translate (pix2pix, cyclegan) or "
        "upscale (srgan, in overlapping tiles); --out is then a .png file, or a folder for a folder",
    )
    m.add_argument("--direction", choices=("ab", "ba"), default="ab", help="cyclegan: A -> B (default) or B -> A")
    m.add_argument(
        "--zoom",
        type=int,
        default=0,
        help="--out .png grids: draw each image this many times larger, nearest-neighbour (default 0: "
        "auto, so that each is at least 64 pixels wide)",
    )
    m.add_argument("--drs", action="store_true", help=DRS_HELP)
    _calibrate_args(m)
    _standing_arg(m)
    m.add_argument("--live", action="store_true", help=LIVE_HELP)
    _stored_args(m)
    m.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="measure a checkpoint's EMA generator (mode collapse, sample quality)")
    e.add_argument("--ckpt", required=True, help="a checkpoint step folder, or a run directory (its latest)")
    from distgan.metrics import METRICS

    e.add_argument(
        "--metrics",
        help="comma-separated (default: all that apply to the data): "
        + "; ".join(f"{k}: {v}" for k, v in METRICS.items()).replace("%", "%%"),  # argparse formats help
    )
    e.add_argument("--features", help="a TorchScript feature network (N,C,H,W in [-1,1] -> N,D) for fid/kid")
    e.add_argument(
        "--inception",
        metavar="FILE",
        help="the standard Inception-v3 weights for fid/kid/is/pr, as published: NVIDIA's "
        "inception-2015-12-05.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: "
        "$DISTGAN_INCEPTION); see docs/evaluation.md",
    )
    e.add_argument(
        "--ref",
        metavar="STATS.npz",
        help="with --inception: reference statistics from `distgan stats` or pytorch-fid (mu, sigma) "
        "instead of the run's shards",
    )
    e.add_argument(
        "--ref-n",
        type=int,
        default=0,
        help="with --inception: real images of the shards in the reference statistics (default 0: all)",
    )
    e.add_argument(
        "--chunk",
        type=int,
        default=250,
        help="with --inception: images per unit of work; each chunk draws its noise from its own seed, "
        "so results do not depend on the number of ranks (default 250)",
    )
    e.add_argument(
        "--n",
        type=int,
        default=None,
        help="samples to draw (default 50000 with --inception, as fid50k; else 2500, as in PacGAN)",
    )
    e.add_argument("--json", help="also write the results to this JSON file (--watch: its JSON-lines log)")
    e.add_argument(
        "--watch",
        action="store_true",
        help="--ckpt is a run directory: evaluate each of its checkpoints as it appears, off the training "
        "process, one line each in RUN/eval/watch.jsonl, until the run's last step",
    )
    e.add_argument("--poll", type=float, default=30.0, help="--watch: seconds between looks for new checkpoints")
    e.add_argument(
        "--heldout",
        help="image-to-image models: held-out shards to measure on (default: the "
        "training shards' own held-out set, which the builtin sets have); other image models: the "
        "reference images of swd instead of the training shards",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    e.add_argument("--drs", action="store_true", help=DRS_HELP + "; the report adds the acceptance rate")
    _calibrate_args(e)
    _standing_arg(e)
    e.add_argument("--live", action="store_true", help=LIVE_HELP)
    _stored_args(e)
    e.set_defaults(func=_eval)

    st = sub.add_parser("stats", help="Inception reference statistics of a shard set (for eval --ref), cached")
    st.add_argument("--shards", required=True, help="the shard set: a folder, brace pattern or URL (as data.shards)")
    st.add_argument("--inception", metavar="FILE", help="the Inception weights file (default: $DISTGAN_INCEPTION)")
    st.add_argument(
        "--resolution",
        type=int,
        help="decode at this size, as the run's data.resolution (default: the manifest's image size)",
    )
    st.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3, as data.channels (default: the manifest's)")
    st.add_argument("--n", type=int, default=0, help="the first N images (default 0: all)")
    st.add_argument(
        "--image-key",
        default="",
        help="as data.image_key: the image member (default: the first "
        "of png, jpg, jpeg, webp, ppm, bmp, tif, tiff present)",
    )
    st.add_argument(
        "--crop",
        choices=("center", "random", "none"),
        default="center",
        help="as data.crop (random is taken as center: statistics do not depend on a seed)",
    )
    st.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="as data.on_error: stop at a bad sample (default), or skip and count it",
    )
    st.add_argument("--chunk", type=int, default=250, help="images per batch of work (default 250)")
    st.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    st.add_argument("--out", help="also write the statistics here (.npz: mu, sigma, features, n, meta)")
    st.set_defaults(func=_stats)

    c = sub.add_parser("config", help="print the resolved config of a preset or file plus overrides, as YAML")
    which = c.add_mutually_exclusive_group()
    which.add_argument("--preset", help="a preset shipped with distgan (default digits-dcgan)")
    which.add_argument("--config", help="a YAML config file")
    c.add_argument("--doc", action="store_true", help="print the reference of every key (docs/config.md) instead")
    c.add_argument(
        "--flags",
        action="store_true",
        help="print the reference of every command's flags (the end of docs/usage.md) instead",
    )
    c.add_argument(
        "--params",
        action="store_true",
        help="print each model's parameter count instead (r3gan models: and their forward FLOPs per image)",
    )
    c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")
    c.set_defaults(func=_config)

    i = sub.add_parser(
        "import",
        help="turn another trainer's network snapshot into a distgan run directory (read without running its code)",
    )
    i.add_argument("snapshot", help="the snapshot file, e.g. R3GAN's network-snapshot-NNNNNNNNN.pkl")
    i.add_argument("--from", dest="source", required=True, choices=("r3gan",), help="the trainer that wrote it")
    i.add_argument("--out", required=True, help="a new run directory (gets checkpoints/step-00000000)")
    i.add_argument(
        "--preset", help="the preset for the run's other settings (default: the r3gan-* template that fits it)"
    )
    i.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of those settings")
    i.set_defaults(func=_import)

    r = sub.add_parser("presets", help="list the presets")
    r.set_defaults(func=_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options: collect the leftovers as overrides for `train`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except UserError as exc:
        print(f"distgan {args.command}: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"distgan {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distgan {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A DataLoader worker re-raises a UserError under its own exception type.
        if "UserError: " in str(exc):
            print(f"distgan {args.command}: error: {user_message(exc)}", file=sys.stderr)
            return 2
        raise
