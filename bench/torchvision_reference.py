#!/usr/bin/env python3
"""The torchvision data pipeline that `vissl bench data` measures ours against.

It runs what VISSL itself runs for SimCLR or SwAV pre-training: a torchvision ImageFolder over the JPEG
corpus, the config's TRANSFORMS applied the way VISSL's SSLTransformsWrapper applies them (a copy-making
transform turns one image into a list, later transforms act on every element), VISSL's collator, and a
PyTorch DataLoader with N worker processes. The pipeline definition is read from the same YAML config our
Rust pipeline reads (configs/bench/<pipeline>_pipeline.yaml), so both sides run one list of transforms.

It prints the throughput in source images per second (views are counted separately), measured after a
warm-up batch that absorbs worker start-up. Runs in `.venv-bench` (`scripts/setup --bench`): it needs the
full torch, torchvision, Pillow and PyYAML.

    .venv-bench/bin/python bench/torchvision_reference.py --data data/bench_corpus/train \
        --workers 2 --batch-size 64 --pipeline simclr --seconds 20 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
PIPELINE_CONFIGS = {
    "simclr": REPO / "configs/bench/simclr_pipeline.yaml",
    "swav": REPO / "configs/bench/swav_pipeline.yaml",
}


def fail(message: str) -> NoReturn:
    print(f"torchvision_reference: error: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import numpy as np
    import PIL
    import torch
    import torchvision
    import torchvision.transforms as T
    import yaml
    from PIL import ImageFilter
    from torch.utils.data import DataLoader, RandomSampler
except ImportError as err:
    fail(f"{err}; run it with .venv-bench/bin/python (created by `scripts/setup --bench`)")


class GaussianBlurPil:
    """VISSL's ImgPilGaussianBlur: with probability p, a PIL Gaussian blur of radius uniform in [min, max]."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        # VISSL draws the coin from numpy and the radius from `random`; same here so worker seeding matches.
        if np.random.rand() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def color_distortion(strength: float = 1.0):
    """VISSL's ImgPilColorDistortion (SimCLR): jitter with p 0.8, then grayscale with p 0.2."""
    jitter = T.ColorJitter(
        brightness=0.8 * strength, contrast=0.8 * strength, saturation=0.8 * strength, hue=0.2 * strength
    )
    return T.Compose([T.RandomApply([jitter], p=0.8), T.RandomGrayscale(p=0.2)])


class Replicate:
    """VISSL's ImgReplicatePil: the same image num_times (copies, so later transforms act independently)."""

    def __init__(self, num_times: int = 2):
        self.num_times = num_times

    def __call__(self, img):
        return [img.copy() for _ in range(self.num_times)]


class MultiCrop:
    """VISSL's ImgPilToMultiCrop: num_crops[i] RandomResizedCrops of size_crops[i] at crop_scales[i]."""

    def __init__(self, total_num_crops: int, num_crops, size_crops, crop_scales):
        if sum(num_crops) != total_num_crops or not len(num_crops) == len(size_crops) == len(crop_scales):
            fail(
                f"ImgPilToMultiCrop: inconsistent total_num_crops={total_num_crops}, num_crops={num_crops}, "
                f"size_crops={size_crops}, crop_scales={crop_scales}"
            )
        self.crops = [
            T.RandomResizedCrop(size, scale=tuple(scale))
            for n, size, scale in zip(num_crops, size_crops, crop_scales, strict=True)
            for _ in range(n)
        ]

    def __call__(self, img):
        return [crop(img) for crop in self.crops]


def random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    return T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio))


# VISSL transform name -> constructor taking the config entry's parameters. Copy-making ones return lists.
TRANSFORMS = {
    "ImgReplicatePil": Replicate,
    "ImgPilToMultiCrop": MultiCrop,
    "RandomResizedCrop": random_resized_crop,
    "RandomHorizontalFlip": lambda p=0.5: T.RandomHorizontalFlip(p=p),
    "ImgPilColorDistortion": color_distortion,
    "ImgPilGaussianBlur": GaussianBlurPil,
    "ToTensor": T.ToTensor,
    "Normalize": lambda mean, std: T.Normalize(mean=mean, std=std),
}
COPY_TRANSFORMS = {"ImgReplicatePil", "ImgPilToMultiCrop"}


class SslTransforms:
    """Applies a VISSL TRANSFORMS list to one image the way SSLTransformsWrapper does; returns the views."""

    def __init__(self, entries: list[dict]):
        self.steps = []
        for entry in entries:
            params = dict(entry)
            name = params.pop("name", None)
            if name not in TRANSFORMS:
                fail(f"transform {name!r} is not supported by the reference (supported: {', '.join(TRANSFORMS)})")
            indices = params.pop("indices", None)
            try:
                transform = TRANSFORMS[name](**params)
            except TypeError as err:
                fail(f"transform {name}: {err}")
            self.steps.append(
                (name, transform, None if indices is None else set(indices if isinstance(indices, list) else [indices]))
            )

    def __call__(self, img):
        views = [img]
        for name, transform, indices in self.steps:
            if name in COPY_TRANSFORMS:
                views = [copy for view in views for copy in transform(view)]
            else:
                views = [transform(v) if indices is None or i in indices else v for i, v in enumerate(views)]
        return views


def simclr_collator(batch):
    """All first views, then all second views, ... as one tensor (VISSL's simclr_collator)."""
    views = [sample[0] for sample in batch]
    labels = torch.tensor([sample[1] for sample in batch])
    stacked = torch.stack([view[pos] for pos in range(len(views[0])) for view in views])
    return {"data": [stacked], "label": [labels.repeat(len(views[0]))]}


def multicrop_collator(batch):
    """One tensor per crop position, since crop sizes differ (VISSL's multicrop_collator)."""
    views = [sample[0] for sample in batch]
    labels = torch.tensor([sample[1] for sample in batch])
    per_crop = [torch.stack([view[pos] for view in views]) for pos in range(len(views[0]))]
    return {"data": [per_crop], "label": [labels.repeat(len(views[0]))]}


COLLATORS = {"simclr_collator": simclr_collator, "multicrop_collator": multicrop_collator}


def load_train_config(path: Path) -> dict:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        fail(f"cannot read pipeline config {path}: {err}")
    try:
        return document["config"]["DATA"]["TRAIN"]
    except (KeyError, TypeError):
        fail(f"{path} has no config.DATA.TRAIN block")


def resolve_data_dir(arg: str | None, train: dict) -> Path:
    """--data, else the config's first DATA_PATHS entry (relative to the repository root)."""
    if arg is not None:
        data = Path(arg)
    else:
        paths = train.get("DATA_PATHS") or []
        if not paths:
            fail("no --data given and the config has no DATA_PATHS")
        data = Path(paths[0]) if Path(paths[0]).is_absolute() else REPO / paths[0]
    if not data.is_dir():
        fail(f"data folder {data} does not exist; build the corpus with `make corpus`")
    return data


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the DataLoader workers).

    CPU time, unlike wall time, does not depend on what else the machine runs, so images per CPU-second is
    the fair per-core comparison with `vissl bench data`, which reads the same /proc fields for itself.
    """
    me = os.getpid()
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state ppid ... utime(12th) stime(13th), counting from state = 1st.
        if int(entry) == me or int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def measure(loader: DataLoader, batch_size: int, seconds: float) -> dict:
    """Images/s over `seconds` after the first batch, which pays for worker start-up and warm caches."""
    batches = iter(loader)
    started = time.perf_counter()
    next(batches)
    warmup = time.perf_counter() - started
    images = 0
    started = time.perf_counter()
    cpu_started = process_tree_cpu_seconds()
    while True:
        next(batches)
        images += batch_size
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    cpu = process_tree_cpu_seconds() - cpu_started
    return {"images": images, "seconds": elapsed, "warmup_s": warmup, "cpu_seconds": cpu}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="torchvision DataLoader throughput for VISSL's SimCLR or SwAV pipeline"
    )
    parser.add_argument(
        "--pipeline",
        choices=sorted(PIPELINE_CONFIGS),
        default="simclr",
        help="which configs/bench/<pipeline>_pipeline.yaml to run (default: %(default)s)",
    )
    parser.add_argument("--config", type=Path, help="another VISSL config whose DATA.TRAIN block to run instead")
    parser.add_argument(
        "--data", help="ImageFolder root, the folder holding class_*/ (default: the config's DATA_PATHS[0])"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="DataLoader worker processes; 0 = in the main process (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="source images per batch (default: the config's BATCHSIZE_PER_REPLICA)"
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measuring time after the warm-up batch (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling and augmentation seed (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a sentence")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must not be negative")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config_path = args.config or PIPELINE_CONFIGS[args.pipeline]
    train = load_train_config(config_path)
    data = resolve_data_dir(args.data, train)
    batch_size = args.batch_size or int(train.get("BATCHSIZE_PER_REPLICA", 64))
    collate_name = train.get("COLLATE_FUNCTION", "default_collate")
    if collate_name not in COLLATORS:
        fail(f"COLLATE_FUNCTION {collate_name!r} is not supported by the reference (supported: {', '.join(COLLATORS)})")

    # One core per worker: DataLoader workers already run single-threaded, and with --workers 0 the main
    # process would otherwise spread ToTensor/Normalize over every core and skew the per-core comparison.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    transforms = SslTransforms(train.get("TRANSFORMS") or [])
    dataset = torchvision.datasets.ImageFolder(str(data), transform=transforms)
    if len(dataset) < batch_size:
        fail(f"{data} holds {len(dataset)} images, fewer than one batch of {batch_size}")
    # Sampling with replacement gives an endless stream, so no epoch boundary (and worker restart) falls
    # inside the measurement.
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=1 << 40, generator=torch.Generator().manual_seed(args.seed)
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=COLLATORS[collate_name],
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    try:
        views_per_image = len(transforms(dataset.loader(dataset.samples[0][0])))
        result = measure(loader, batch_size, args.seconds)
    except (OSError, RuntimeError) as err:
        # torchvision's ImageFolder has no skip-and-count for broken files; the corpus must be clean.
        fail(f"loading {data} failed: {err}")
    images_per_s = result["images"] / result["seconds"]
    report = {
        "images_per_s": images_per_s,
        "views_per_s": images_per_s * views_per_image,
        "workers": args.workers,
        "batch_size": batch_size,
        "pipeline": args.pipeline if args.config is None else str(args.config),
        "views_per_image": views_per_image,
        "images": result["images"],
        "seconds": result["seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "images_per_cpu_s": result["images"] / max(result["cpu_seconds"], 1e-9),
        "warmup_s": result["warmup_s"],
        "dataset_images": len(dataset),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
    }
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(
            f"torchvision {report['torchvision']} {report['pipeline']}: {images_per_s:.1f} images/s "
            f"({report['views_per_s']:.1f} views/s) with {args.workers} workers, batch {batch_size}, "
            f"{result['images']} images in {result['seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
