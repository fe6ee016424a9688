"""Train, evaluate and report a real-vs-fake face image detector.

    python main.py --epochs 10 --batch_size 16 --lr 1e-4             # Dataset/, ImageNet ResNet18
    python main.py --data_root ../shared/data/faces140k --weights none --epochs 3
    python main.py --resume --output_dir results                     # continue results/checkpoints/last.pt
    python main.py --evaluate_only --checkpoint results/checkpoints/best.pt
    torchrun --standalone --nproc_per_node=4 main.py --data_root big/   # 4 GPUs (or CPU processes)

Everything a grader needs lands in --output_dir (default results/): summary.md
first, then the report, plots, metrics.json, history.csv, args.json, split.csv.
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

import autoencoder
import config
import dataset
import engine
import evaluate
import presets
import report
import sbi
import training
import utils
from cli import (DEFAULT_WORKERS, add_machine_flags, at_least, checked, fraction, given_flags, interruptible,
                 positive, silence)
from config import PRETRAINED, SCRATCH
from model import INPUT_FILTERS, MODELS, WeightsError, check_name, detector_from
from presets import AUGMENTATIONS, CROP_PCT, ROUTES


def get_args_parser():
    parser = argparse.ArgumentParser(description="Deepfake face-image detector", add_help=True)
    g = parser.add_argument_group("data")
    g.add_argument("--data_root", default="Dataset", help="folder with real_data/ and fake_data/, or "
                   "train/val/test/ with those inside (default: Dataset)")
    g.add_argument("--val_fraction", type=fraction, default=0.15, help="share of images for validation (default: 0.15)")
    g.add_argument("--test_fraction", type=fraction, default=0.15, help="share of images for test (default: 0.15)")
    g.add_argument("--max_per_class", type=at_least(int, 0), default=0, help="use a seeded random subset of "
                   "N images per class, for quick runs (default: 0 = all)")
    g.add_argument("--balance", choices=["none", "sampler", "oversample"], default="none",
                   help="balance classes in the training split only: weighted sampler or repeated "
                   "minority images (default: none)")
    g.add_argument("--augment", choices=["auto", *AUGMENTATIONS], default="auto",
                   help="training augmentation (presets.py): none (as evaluation), flip, crop_flip, blur_jpeg (random "
                   "crop, flip, blur and JPEG each on 10%% of the images, Wang et al. 2020), blur_jpeg_0.5 (the "
                   "same on half the images), rescale (flip, half the images shrunk to 50-100%% and enlarged back), "
                   "compress (flip, JPEG 40-100 on half the images, as online video), video (compress, and half the "
                   "images shrunk to 25-100%% and enlarged back, as faces cut from video); none with a frozen backbone "
                   "trains "
                   f"the head on cached features (default: auto = {PRETRAINED['augment']} with pretrained weights, "
                   f"{SCRATCH['augment']} from random init)")
    g.add_argument("--input_jpeg", type=at_least(int, 0), default=None, metavar="QUALITY",
                   help="re-encode every image as JPEG at QUALITY (1-100) just before the network, in training, "
                   "evaluation and predict.py alike, so that every input carries the same compression and its "
                   "absence (a PNG, a large photo scaled down) is no cue; 0 = off (default: "
                   f"{PRETRAINED['input_jpeg']} with pretrained weights, {SCRATCH['input_jpeg']} from random init)")
    g.add_argument("--pseudo_fakes", choices=["none", "sbi", "sbi_only", "taef2"], default="none",
                   help="pseudo-fakes made from the real training images: sbi adds a self-blend of each (sbi.py), "
                   "sbi_only trains on real images and their self-blends alone; taef2 adds each one's reconstruction "
                   "by a latent diffusion autoencoder (autoencoder.py), made once and cached (default: none)")
    g.add_argument("--pseudo_from", choices=["all", "train_extra"], default="all",
                   help="which real training images get a pseudo-fake: all, or only those of the --train_extra "
                   "folders (the --data_root reals then stay plain reals) (default: all)")
    g.add_argument("--latent_weights", default=str(autoencoder.DEFAULT_WEIGHTS), metavar="DIR",
                   help=f"folder holding {' and '.join(autoencoder.FILES)} for --pseudo_fakes taef2 "
                   "(github.com/madebyollin/taesd) (default: ../shared/weights/taef2)")
    g.add_argument("--sbi_mask", choices=sbi.MASKS, default="ellipse",
                   help="blend mask of the self-blends: ellipse from 5 landmarks (YuNet), or hull of dlib's 68 "
                   "landmarks (needs pip install -r requirements-optional.txt, 100 MB) (default: ellipse)")
    g.add_argument("--train_extra", nargs="+", default=[], metavar="DIR",
                   help="folders whose real_data/ and/or fake_data/ images join the training split only, never "
                   "val or test: e.g. real faces cut from videos with faces.py (default: none)")
    g.add_argument("--test_sets", nargs="+", default=[], metavar="NAME=PATH",
                   help="extra held-out folders scored after training, e.g. dfdc=../shared/data/dfdc_crops (a bare "
                   "folder is named after itself): real_data/ and fake_data/ inside, or a folder of one kind "
                   "(default: none)")
    g.add_argument("--image_size", type=at_least(int, 32), default=None,
                   help="input size in pixels, at least 32 (the backbones downsample 32x) (default: the model's "
                   "ImageNet size with pretrained weights: 224, 384 for efficientnet_v2_s; "
                   f"{SCRATCH['image_size']} from random init)")
    g.add_argument("--input_route", choices=ROUTES, default="resize",
                   help="how an image becomes the square the network crops from, in training, evaluation and "
                   "predict.py alike: resize (the short side to image_size / crop_pct) or crop (the centre square "
                   "at the image's own pixels, never resampled; smaller images are enlarged) (default: resize)")
    g.add_argument("--crop_pct", type=at_least(float, 0.5), default=CROP_PCT, metavar="PCT",
                   help="input size / cached size: images are resized to image_size / PCT and cropped to "
                   "image_size (random crops in training, centre crops in evaluation); 1 feeds the whole face "
                   f"resized to the input (default: {CROP_PCT} = 224/256)")
    g.add_argument("--cache_dir", default="cache", help="decoded-image cache; delete it any time (default: cache)")
    g.add_argument("--workers", type=at_least(int, 0), default=DEFAULT_WORKERS,
                   help="data-loading processes; 0 loads in the main process (default: min(2, CPU count))")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="resnet18", type=checked(check_name), metavar="NAME",
                   help=f"backbone: {', '.join(MODELS)} (efficientnet_lite0's ImageNet weights come with the "
                   f"install, the others download), or timm:NAME for any timm model (default: resnet18)")
    g.add_argument("--weights", default="imagenet", help="imagenet (downloaded once by torchvision or timm; "
                   "efficientnet_lite0's come with the install), none (random init), or PATH to a backbone state_dict "
                   "file (default: imagenet)")
    g.add_argument("--input_filter", choices=list(INPUT_FILTERS), default="none",
                   help="what the backbone sees, computed inside the model: none (the image), npr (the image minus "
                   "its nearest-neighbour 2x down-and-up-sampled copy: generators' up-sampling traces, Tan et al. "
                   "2024), highpass (the image minus its 3x3 mean) (default: none)")
    g.add_argument("--freeze_backbone", action="store_true", help="train the two-class head only (default: off)")
    g.add_argument("--unfreeze_at", type=positive(int), default=None, metavar="EPOCH",
                   help="train the head only for epochs 1..EPOCH-1, then everything from EPOCH on "
                   "(default: off)")
    g.add_argument("--backbone_lr_scale", type=float, default=None, metavar="SCALE",
                   help="backbone learning rate = lr * SCALE, the head keeps lr (default: 0.1 with "
                   "--unfreeze_at, else 1.0)")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=positive(int), default=10, help="number of epochs (default: 10)")
    g.add_argument("--batch_size", type=positive(int), default=16, help="images per batch (default: 16)")
    g.add_argument("--lr", type=positive(float), default=1e-4, help="AdamW peak learning rate (default: 1e-4)")
    g.add_argument("--warmup_epochs", type=at_least(float, 0), default=0.0, metavar="EPOCHS",
                   help="linear warm-up of the learning rate over this many epochs, step by step, before the "
                   "cosine decay (engine.lr_factor) (default: 0)")
    g.add_argument("--min_lr_ratio", type=at_least(float, 0), default=0.0, metavar="RATIO",
                   help="the cosine decays to lr * RATIO at the last step; 1 keeps the learning rate constant "
                   "(default: 0)")
    g.add_argument("--weight_decay", type=at_least(float, 0), default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--ema_decay", type=fraction, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights, moved by 1 - DECAY towards them after "
                   "every step (0.998: half-life about 350 steps; bias-corrected, engine.weight_average); "
                   "validation, checkpoints, the report and predict.py then use the average (default: 0 = off)")
    g.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="test-time augmentation: flip averages each image's logits with its mirror image's, in "
                   "validation, test and predict.py (default: none)")
    g.add_argument("--seed", type=at_least(int, 0, maximum=2**32 - 1), default=0,
                   help="seeds the split, init and batches, 0 to 2**32 - 1 (default: 0)")
    add_machine_flags(g, runtime="torch")
    g = parser.add_argument_group("several processes (torchrun --nproc_per_node=N main.py ...)")
    g.add_argument("--sync_bn", action="store_true", help="BatchNorm statistics over the global batch, "
                   "not each process's (CUDA only) (default: off)")
    g.add_argument("--dist_timeout", type=positive(int), default=1800, metavar="SECONDS",
                   help="a process that waits this long for the others (one died or hangs) stops with an "
                   "error (default: 1800)")
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", default="results", help="where reports and checkpoints go (default: results)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default: <output_dir>/checkpoints/last.pt) with its flags; "
                   "--epochs, --workers, --device and --precision may be given anew")
    g.add_argument("--overwrite", action="store_true", help="allow replacing an earlier run in --output_dir")
    g.add_argument("--evaluate_only", action="store_true", help="only evaluate --checkpoint and write the report")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --evaluate_only "
                   "(default: <output_dir>/checkpoints/best.pt)")
    g.add_argument("--eval_split", choices=["test", "all"], default="test", help="with --evaluate_only: the "
                   "test split of the checkpoint's data split, or every image under --data_root (default: test)")
    return parser


def test_set_item(parser, item):
    """A --test_sets item as NAME=PATH: a folder given bare (its path may hold '=') is named after itself."""
    if Path(item).is_dir():
        return f"{Path(item).resolve().name.replace('=', '_')}={item}"
    name, eq, path = item.partition("=")
    if not eq or not name or not path or "/" in name or os.sep in name:
        parser.error(f"--test_sets takes NAME=PATH items or folders; {item!r} is no folder"
                     + (f", and {name!r} before '=' is no name" if eq and name else "")
                     + " (e.g. sd=../shared/data/generators/sd14_blonde_woman)")
    return item


def parse_args(argv=None):
    """Parse and check the flags; args.given lists the ones the command line really gave."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.val_fraction + args.test_fraction >= 1:
        parser.error(f"--val_fraction + --test_fraction must leave images to train on "
                     f"(got {args.val_fraction} + {args.test_fraction})")
    if args.min_lr_ratio > 1:
        parser.error(f"--min_lr_ratio must be at most 1 (a constant learning rate), got {args.min_lr_ratio}")
    if args.input_jpeg is not None and args.input_jpeg > 100:
        parser.error(f"--input_jpeg is a JPEG quality, 1 to 100 (0: off), got {args.input_jpeg}")
    if args.crop_pct > 1:
        parser.error(f"--crop_pct must be at most 1 (the whole image), got {args.crop_pct}")
    args.test_sets = [test_set_item(parser, item) for item in args.test_sets]
    names = [item.split("=", 1)[0] for item in args.test_sets]
    if len(set(names)) < len(names):
        parser.error(f"--test_sets names must differ, got {' '.join(names)}")
    args.given = given_flags(get_args_parser, argv, args)  # a resume keeps the checkpoint's value of the others
    return args


# ---------------------------------------------------------------- data

def load_data(args, model, dist):
    """The splits as DeepfakeDatasets; rank 0 decodes the cache first, the other processes then read it."""
    with utils.main_rank_first(dist):
        data = dataset.prepare_data(args.data_root, presets.transforms(vars(args), model.mean, model.std),
                                    args.val_fraction, args.test_fraction, args.seed, args.max_per_class,
                                    args.cache_dir, args.workers, train_extra=args.train_extra)
        train = data.datasets["train"]
        extra_only = args.pseudo_from == "train_extra"
        reals = sbi.pseudo_sources(train, extra_only)
        if args.pseudo_fakes == "taef2":
            store = autoencoder.make_reconstructions(train.cache, reals, args.latent_weights)
            train = sbi.with_pseudo_fakes(train, autoencoder.Reconstruction(store, {s.row: s.digest for s in reals}),
                                          extra_only=extra_only)
        elif args.pseudo_fakes != "none":
            geometry = sbi.load_geometry(train.cache, [s.row for s in reals], args.sbi_mask)
            blend = sbi.SelfBlend(geometry)
            if blend.no_face:
                print(f"warning: --pseudo_fakes: no face found in {blend.no_face} of {len(geometry)} real training "
                      f"images; their self-blends use a mask in the middle of the picture (face crops only)")
            train = sbi.with_pseudo_fakes(train, blend, only=args.pseudo_fakes == "sbi_only", extra_only=extra_only)
    if not (args.evaluate_only and args.eval_split == "all"):  # a held-out folder needs no split
        dataset.check_splits(data, args.data_root, args.val_fraction, args.test_fraction)
    data.datasets["train"] = dataset.oversample(train) if args.balance == "oversample" else train
    return data


# ---------------------------------------------------------------- main

def main(args):
    dist, device = utils.init_distributed(args.device, args.dist_timeout)
    if not dist.main:
        silence()  # rank 0 prints and writes for all
    if dist.on:  # torchrun stops every process when one fails: say why, instead of dying silently
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"rank {dist.rank}: stopped by torchrun (another process "
                                                          f"failed or was stopped); last.pt keeps the last epoch"))
    config.single_process_only(args, dist)
    args, ckpt, ckpt_path = config.resolve(args, dist, device)  # from here on, nothing is "auto"
    utils.seed_everything(args.seed)
    out, stale = config.prepare_output(args, ckpt_path, write=dist.main)  # checked and locked, nothing removed
    precision = utils.choose_precision(device, args.precision)
    print(f"running on {args.machine}: {precision}")
    try:
        if args.evaluate_only:
            detector = engine.load_detector(ckpt_path, device, args.precision, tta=args.tta)
            model = detector.model
        else:
            model = detector_from(vars(args), args.weights if ckpt is None else "none")
        data = load_data(args, model, dist)
    except (WeightsError, ValueError, dataset.DatasetError, engine.CheckpointError, autoencoder.AutoencoderError) as e:
        sys.exit(f"error: {e}")
    if ckpt is not None and not (args.evaluate_only and args.eval_split == "all"):
        config.check_same_split(ckpt.get("split"), data.samples, args.data_root)
    if dist.main:  # every check that can refuse has passed: only now does anything in out change
        config.start_output(args, out, stale, ckpt_path)
        dataset.write_split_csv(data.samples, out / "split.csv")
        report.write_json(config.recorded(args), out / "args.json")
        if args.pseudo_fakes in ("sbi", "sbi_only") and not args.evaluate_only:
            sbi.save_examples(data.datasets["train"], out / "pseudo_fakes.png")
        elif args.pseudo_fakes == "taef2" and not args.evaluate_only:
            autoencoder.save_examples(data.datasets["train"], out / "pseudo_fakes.png")
    history, scored = [], None
    if not args.evaluate_only:
        precision.prepare(model)
        start = time.perf_counter()
        history = training.fit(args, model, data, precision, out, dist, resume_from=ckpt)
        print(f"trained in {time.perf_counter() - start:.0f} s")
        if dist.on:
            torch.distributed.barrier()  # rank 0's last checkpoint is on disk before anyone reads it
        best = out / "checkpoints" / "best.pt"
        scored = best if best.exists() else out / "checkpoints" / "last.pt"
        detector = engine.load_detector(scored, device, args.precision)
    metrics = evaluate.evaluate_and_report(args, detector, data, out, history, dist,
                                           record_in=scored)
    for note in args.notes:  # said at the start; said again where the run ends
        print(f"note: {note}")
    if dist.on:
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    interruptible(main, parse_args())  # Ctrl-C: no traceback; training keeps its last epoch (training.py)
