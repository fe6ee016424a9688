"""Frozen-backbone fast path: push the images through the backbone once, then train the head.

With the backbone frozen (--freeze_backbone, or the epochs before --unfreeze_at) and no
augmentation (--augment none), every epoch would send the same images through the same
fixed network and get the same features back. main.py then computes those features once
(train and val, backbone in eval mode, bf16 where the plain path uses it), keeps them in
memory as one tensor per split, and trains the head on them. The head sees exactly the
features the plain path would give it, so the results agree up to float rounding, and
every epoch after the first costs a tiny fraction of a forward pass.

    python main.py --data_root ../shared/data/faces140k --weights none --freeze_backbone --augment none
    python features.py --data_root ../shared/data/faces140k --weights none --max_per_class 150  # benchmark

Memory: N x D float32 (1800 images x 512 for resnet18 = 3.7 MB; 140k x 2048 = 1.1 GB).
The test split is scored once at the end by the full model, so it is not cached.
"""
import time

import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from tqdm import tqdm

import engine


@torch.no_grad()  # not inference_mode: the head's backward later needs these tensors as inputs
def extract(backbone, loader, device, amp_dtype=None, channels_last=False):
    """One pass in eval mode over an unshuffled loader: (N, D) float32 features and (N,) labels on CPU."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, target in tqdm(loader, desc="caching features", leave=False, unit="batch"):
        images = engine._to_device(images, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats.append(backbone(images).float().cpu())  # bf16 -> float32 is exact: nothing is lost
        labels.append(target)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def feature_loader(backbone, loader, device, amp_dtype=None, channels_last=False):
    """A loader over cached features that draws the same batches as `loader` would.

    It reuses `loader`'s sampler (shuffled, weighted or sequential), so with the global
    seed set as main.py sets it the head gets the same images in the same order. The
    sampler is wrapped in a BatchSampler so each batch is one tensor index, not B lookups.
    """
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                         num_workers=loader.num_workers)
    feats, labels = extract(backbone, ordered, device, amp_dtype, channels_last)
    return DataLoader(TensorDataset(feats, labels), batch_size=None,
                      sampler=BatchSampler(loader.sampler, loader.batch_size, drop_last=loader.drop_last))


def feature_loaders(backbone, loaders, device, amp_dtype=None, channels_last=False):
    """{split: feature loader} for each image loader in `loaders` (main.py passes train and val)."""
    sizes = " + ".join(f"{len(ld.dataset)} {split}" for split, ld in loaders.items())
    print(f"backbone frozen and no augmentation: computing features of {sizes} images once (features.py)")
    return {split: feature_loader(backbone, ld, device, amp_dtype, channels_last) for split, ld in loaders.items()}


def benchmark_feature_cache(args, head_epochs=5):
    """Time, in one run on the same data: a full training epoch, a frozen-backbone epoch on
    images, the one-time feature pass, and head epochs on cached features. Returns the numbers.

    `args` are main.py's flags (data, model, batch size, precision); augmentation is turned off.
    """
    import main  # here, not at the top: main.py imports this module
    from model import DeepfakeDetector

    engine.seed_everything(args.seed)
    device = engine.get_device(args.device)
    amp = engine.autocast_dtype(device, args.precision)
    args.augment = "none"
    model = DeepfakeDetector(args.model, args.weights, image_size=args.image_size)
    args.image_size = args.image_size or model.input_size
    data = main.load_data(args, model)
    model.to(device)
    if amp is not None:
        model.to(memory_format=torch.channels_last)
    train = main.make_loader(data.datasets["train"], args, True)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.param_groups(args.lr, 1.0), lr=args.lr)

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def epoch(net, loader, channels_last):
        return timed(lambda: engine.train_one_epoch(net, criterion, optimizer, loader, device, 0, amp,
                                                    channels_last=channels_last, desc="benchmark"))

    epoch(model, train, False)  # warm-up: first-call kernel selection and worker start-up are not epoch cost
    model.freeze_backbone(False)
    full = epoch(model, train, amp is not None)
    model.freeze_backbone(True)
    frozen = epoch(model, train, amp is not None)
    cached = {}
    extract_s = timed(lambda: cached.update(train=feature_loader(model.backbone, train, device, amp,
                                                                 amp is not None)))
    head = [epoch(model.head, cached["train"], False) for _ in range(head_epochs)]
    head_s = sorted(head)[len(head) // 2]  # median: one slow epoch (a page fault, a GC) is not the cost
    rows = [("full training epoch (backbone + head)", full, 1.0),
            ("frozen backbone, plain path (forward every epoch)", frozen, full / frozen),
            ("frozen backbone, feature pass (first epoch, once)", extract_s, full / extract_s),
            (f"frozen backbone, cached features (median of {head_epochs})", head_s, full / head_s)]
    print(f"\n{args.model}, {len(data.datasets['train'])} training images at {args.image_size} px, "
          f"batch {args.batch_size}, {device} / {amp or 'fp32'}")
    print(f"{'epoch':<58}{'seconds':>10}{'x cheaper':>12}")
    for name, seconds, ratio in rows:
        print(f"{name:<58}{seconds:>10.4f}{ratio:>12.1f}")
    return {"full_epoch_s": full, "frozen_epoch_s": frozen, "feature_pass_s": extract_s,
            "head_epoch_s": head_s, "speedup": full / head_s}


if __name__ == "__main__":
    import main
    benchmark_feature_cache(main.parse_args())
