"""Frozen-backbone fast path: push the images through the backbone once, then train the head.

With the backbone frozen (--freeze_backbone, or the epochs before --unfreeze_at) and no
augmentation (--augment none), every epoch would send the same images through the same
fixed network and get the same features back. main.py then computes those features once
(train and val, backbone in eval mode, in the run's precision), keeps them in memory as
one tensor per split, and trains the head on them. The head sees exactly the features the
plain path would give it, so the results agree up to float rounding, and every epoch after
the first costs a tiny fraction of a forward pass (`python benchmark.py features` measures it).

    python main.py --data_root ../shared/data/faces140k --weights none --freeze_backbone --augment none

Memory: N x D float32 (1800 images x 512 for resnet18 = 3.7 MB; 140k x 2048 = 1.1 GB).
The test split is scored once at the end by the full model, so it is not cached.
"""
import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from cli import progress


@torch.no_grad()  # not inference_mode: the head's backward later needs these tensors as inputs
def extract(backbone, loader, precision):
    """One pass in eval mode over an unshuffled loader: (N, D) float32 features and (N,) labels on CPU."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, target in progress(loader, "caching features"):
        with precision.autocast():
            feats.append(backbone(precision.to_device(images)).float().cpu())  # bf16 -> float32 is exact
        labels.append(target)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def feature_loader(backbone, loader, precision):
    """A loader over cached features that draws the same batches as `loader` would.

    It reuses `loader`'s sampler (shuffled, weighted or sequential), so with the global
    seed set as main.py sets it the head gets the same images in the same order. The
    sampler is wrapped in a BatchSampler so each batch is one tensor index, not B lookups.
    """
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                         num_workers=loader.num_workers)
    feats, labels = extract(backbone, ordered, precision)
    return DataLoader(TensorDataset(feats, labels), batch_size=None,
                      sampler=BatchSampler(loader.sampler, loader.batch_size, drop_last=loader.drop_last))


def feature_loaders(backbone, loaders, precision):
    """{split: feature loader} for each image loader in `loaders` (main.py passes train and val)."""
    sizes = " + ".join(f"{len(ld.dataset)} {split}" for split, ld in loaders.items())
    print(f"backbone frozen and no augmentation: computing features of {sizes} images once (features.py)")
    return {split: feature_loader(backbone, ld, precision) for split, ld in loaders.items()}
