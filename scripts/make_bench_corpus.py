#!/usr/bin/env python3
"""Build the JPEG corpus that `vissl bench data` and bench/torchvision_reference.py read.

The corpus imitates ImageNet's files (DESIGN.md "Benchmark data"): random crops of real photographs, resized
to 400-500 x 300-400 pixels, saved as JPEG quality 90, in the ImageFolder layout `OUT/train/class_k/*.jpg`.
The photographs come from Debian's `plasma-workspace-wallpapers` and `mate-backgrounds` packages
(`scripts/setup --wallpapers` installs them). Every file is a function of (seed, class, index), so the same
seed and Pillow version give the same bytes. A complete corpus with the same parameters is left alone.

Which wallpapers are photographs
--------------------------------
No pixel statistic we tried separates the photographs in these two packages from the rendered art: distinct
colour counts, Laplacian noise estimates and the share of perfectly smooth pixels all overlap between, say,
the grey pier photograph `ColdRipple` and the vector landscape `PastelHills`. So the selection is:

1. Raster files only (`.jpg`, `.jpeg`, `.png`); SVG and the `screenshot.*` previews are skipped. Symlinked
   duplicates count once, and of the several resolutions of one wallpaper only the largest is used.
2. A wallpaper is a photograph when it is in KNOWN_PHOTOGRAPHS below, a list made by looking at every image
   of the Debian 12 packages (12 photos of mate's `nature` set, 11 photos of the plasma set).
3. When fewer than MIN_SOURCES of those are installed (a different package version), the fallback rule is a
   JPEG whose EXIF names a camera maker. It finds about half of the photographs above, and one edited photo
   collage (`Elephants`), which is why it is not the primary rule.
4. Every source must also have at least MIN_DISTINCT_COLORS colours in a 256 px thumbnail (flat fills and
   stripe patterns have a handful) and a short side of at least MIN_SOURCE_SIDE pixels.

`--list-sources` prints each candidate with the rule that kept or dropped it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # 5120x2880 wallpapers trip Pillow's decompression-bomb guard

SOURCE_ROOTS = (Path("/usr/share/wallpapers"), Path("/usr/share/backgrounds"))
RASTER_SUFFIXES = {".jpg", ".jpeg", ".png"}
KNOWN_PHOTOGRAPHS = frozenset(
    {
        "backgrounds/mate/nature/Aqua",
        "backgrounds/mate/nature/Blinds",
        "backgrounds/mate/nature/Dune",
        "backgrounds/mate/nature/FreshFlower",
        "backgrounds/mate/nature/Garden",
        "backgrounds/mate/nature/GreenMeadow",
        "backgrounds/mate/nature/LadyBird",
        "backgrounds/mate/nature/RainDrops",
        "backgrounds/mate/nature/Storm",
        "backgrounds/mate/nature/TwoWings",
        "backgrounds/mate/nature/Wood",
        "backgrounds/mate/nature/YellowFlower",
        "wallpapers/BytheWater",
        "wallpapers/ColdRipple",
        "wallpapers/ColorfulCups",
        "wallpapers/DarkestHour",
        "wallpapers/EveningGlow",
        "wallpapers/FallenLeaf",
        "wallpapers/Grey",
        "wallpapers/Kite",
        "wallpapers/OneStandsOut",
        "wallpapers/Path",
        "wallpapers/summer_1am",
    }
)
MIN_SOURCES = 5
MIN_DISTINCT_COLORS = 64
MIN_SOURCE_SIDE = 600
EXIF_MAKE_TAG = 0x010F

# Output geometry: ImageNet's typical file is about 500x375.
WIDTH_RANGE = (400, 500)
HEIGHT_RANGE = (300, 400)
# A crop spans this fraction of the largest box of the output's aspect ratio that fits the photograph, so
# crops show different content and are mostly downscaled, as ImageNet photos are.
CROP_LINEAR_SCALE = (0.3, 1.0)
# Sources larger than this on their long side are first reduced by an integer factor to keep memory small.
MAX_SOURCE_SIDE = 3200
MANIFEST = "manifest.json"
# Bumped whenever the generation rule changes, so an old corpus is rebuilt rather than mixed with new files.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """One wallpaper (all resolutions of it) and the decision about using it."""

    key: str
    path: Path
    size: tuple[int, int]
    reason: str
    photograph: bool


def wallpaper_key(path: Path, root: Path) -> str:
    """Name shared by all resolutions of one wallpaper, e.g. `wallpapers/Path`, `backgrounds/mate/nature/Aqua`."""
    rel = path.relative_to(root.parent)
    parts = rel.parts
    if parts[0] == "wallpapers" and len(parts) > 2:
        return f"wallpapers/{parts[1]}"
    return re.sub(r"_\d+x\d+$", "", rel.with_suffix("").as_posix())


def raster_files(roots: list[Path]) -> dict[str, list[Path]]:
    """Raster images under the roots, grouped by wallpaper, each real file once."""
    groups: dict[str, list[Path]] = {}
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in RASTER_SUFFIXES or path.stem == "screenshot":
                continue
            real = path.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            groups.setdefault(wallpaper_key(path, root), []).append(real)
    return groups


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def image_pixels(path: Path) -> int:
    width, height = image_size(path)
    return width * height


def has_camera_exif(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "JPEG" and bool(str(im.getexif().get(EXIF_MAKE_TAG, "")).strip("\x00 "))


def content_problem(path: Path) -> str | None:
    """Why a file is unusable as a photograph source, or None."""
    with Image.open(path) as im:
        if min(im.size) < MIN_SOURCE_SIDE:
            return f"short side {min(im.size)} px < {MIN_SOURCE_SIDE}"
        thumb = im.convert("RGB")
        thumb.thumbnail((256, 256))
        colors = thumb.getcolors(maxcolors=256 * 256)
        if colors is not None and len(colors) < MIN_DISTINCT_COLORS:
            return f"{len(colors)} distinct colours < {MIN_DISTINCT_COLORS}"
    return None


def classify(roots: list[Path]) -> list[Candidate]:
    """Every wallpaper under the roots with the rule that keeps or drops it (module docstring, steps 1-4)."""
    groups = raster_files(roots)
    largest = {key: max(paths, key=image_pixels) for key, paths in groups.items()}
    listed = {key for key in largest if key in KNOWN_PHOTOGRAPHS}
    use_exif = len(listed) < MIN_SOURCES
    candidates = []
    for key in sorted(largest):
        path = largest[key]
        if use_exif:
            chosen = has_camera_exif(path)
            reason = "EXIF names a camera" if chosen else "no camera in EXIF"
        else:
            chosen = key in listed
            reason = "known photograph" if chosen else "not a known photograph"
        if chosen:
            problem = content_problem(path)
            if problem is not None:
                chosen, reason = False, problem
        candidates.append(Candidate(key, path, image_size(path), reason, chosen))
    return candidates


def class_sources(sources: list[Candidate], classes: int) -> list[list[Candidate]]:
    """Sources of each class: disjoint round-robin when there are enough, so classes differ in content."""
    if len(sources) >= classes:
        return [sources[k::classes] for k in range(classes)]
    return [[sources[k % len(sources)]] for k in range(classes)]


def per_class_counts(count: int, classes: int) -> list[int]:
    return [count // classes + (1 if k < count % classes else 0) for k in range(classes)]


def load_source(path: Path) -> Image.Image:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    factor = -(-max(rgb.size) // MAX_SOURCE_SIDE)
    return rgb.reduce(factor) if factor > 1 else rgb


def crop_box(rng: np.random.Generator, src_size: tuple[int, int], out_size: tuple[int, int]) -> tuple[float, ...]:
    """A random box of the output's aspect ratio inside the source."""
    src_w, src_h = src_size
    out_w, out_h = out_size
    aspect = out_w / out_h
    max_w = min(src_w, src_h * aspect)
    min_w = min(max_w, max(out_w, CROP_LINEAR_SCALE[0] * max_w))
    crop_w = rng.uniform(min_w, max_w)
    crop_h = crop_w / aspect
    x0 = rng.uniform(0, src_w - crop_w)
    y0 = rng.uniform(0, src_h - crop_h)
    return (x0, y0, x0 + crop_w, y0 + crop_h)


def class_dir_name(k: int, classes: int) -> str:
    # Zero-padded beyond ten classes so ImageFolder's lexicographic class order matches k.
    return f"class_{k:0{len(str(classes - 1))}d}"


@dataclass(frozen=True)
class Job:
    """One output file: where it goes and how it is cut."""

    rel: str
    source: Path
    out_size: tuple[int, int]
    # Crop box in the source's full-resolution pixel coordinates.
    box: tuple[float, ...]


def plan(sources: list[Candidate], count: int, classes: int, seed: int) -> list[Job]:
    """All output files with their random parameters, drawn per file from (seed, class, index)."""
    jobs = []
    for k, (pool, n) in enumerate(zip(class_sources(sources, classes), per_class_counts(count, classes), strict=True)):
        for j in range(n):
            rng = np.random.default_rng([seed, k, j])
            source = pool[int(rng.integers(len(pool)))]
            out_size = (
                int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1)),
                int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1)),
            )
            box = crop_box(rng, source.size, out_size)
            jobs.append(Job(f"train/{class_dir_name(k, classes)}/{k}_{j:05d}.jpg", source.path, out_size, box))
    return jobs


def render(jobs: list[Job], out: Path, quality: int) -> None:
    """Writes the planned files, decoding each source photograph once."""
    by_source: dict[Path, list[Job]] = {}
    for job in jobs:
        by_source.setdefault(job.source, []).append(job)
    for source_path, source_jobs in sorted(by_source.items()):
        full_size = image_size(source_path)
        image = load_source(source_path)
        scale_x, scale_y = image.size[0] / full_size[0], image.size[1] / full_size[1]
        for job in source_jobs:
            x0, y0, x1, y1 = job.box
            box = (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)
            crop = image.resize(job.out_size, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            target = out / job.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            crop.save(target, "JPEG", quality=quality)


CORRUPTION_KINDS = ("truncated", "empty", "random_bytes", "jpeg_header_then_garbage")


def write_corrupt(out: Path, jobs: list[Job], n: int, seed: int, classes: int) -> list[str]:
    """N undecodable `.jpg` files spread over the classes, for tests of skip-and-count behaviour."""
    rng = np.random.default_rng([seed, 1_000_003])
    written = []
    for i in range(n):
        kind = CORRUPTION_KINDS[i % len(CORRUPTION_KINDS)]
        rel = f"train/{class_dir_name(i % classes, classes)}/corrupt_{i:03d}_{kind}.jpg"
        if kind == "truncated":
            # Cut right before the start-of-scan marker: headers only, so no decoder can return pixels (a
            # cut inside the scan data is something lenient decoders fill with grey and accept).
            good = (out / jobs[i % len(jobs)].rel).read_bytes()
            data = good[: good.index(b"\xff\xda")]
        elif kind == "empty":
            data = b""
        elif kind == "random_bytes":
            data = rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()
        else:
            data = b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(rel)
    return written


def source_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def parameters(args: argparse.Namespace, sources: list[Candidate]) -> dict:
    """Everything the corpus bytes depend on; a corpus is reused only when these match."""
    import PIL

    return {
        "generator_version": GENERATOR_VERSION,
        "seed": args.seed,
        "count": args.count,
        "classes": args.classes,
        "quality": args.quality,
        "corrupt": args.corrupt,
        "pillow": PIL.__version__,
        "sources": [{"key": s.key, "path": str(s.path), "sha256_16": source_fingerprint(s.path)} for s in sources],
    }


def corpus_is_complete(out: Path, params: dict) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("parameters") != params:
        return False
    return all(
        (out / rel).is_file() and (out / rel).stat().st_size == size for rel, size in manifest.get("files", {}).items()
    )


def foreign_folder(out: Path) -> bool:
    """Whether OUT holds something this script did not make, which it must not delete."""
    return out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()))


def replace_dir(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def build(args: argparse.Namespace, sources: list[Candidate], params: dict) -> None:
    out: Path = args.out
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    jobs = plan(sources, args.count, args.classes, args.seed)
    render(jobs, staging, args.quality)
    corrupt = write_corrupt(staging, jobs, args.corrupt, args.seed, args.classes)
    files = {job.rel: (staging / job.rel).stat().st_size for job in jobs}
    files.update({rel: (staging / rel).stat().st_size for rel in corrupt})
    manifest = {"parameters": params, "corrupt_files": corrupt, "files": files}
    # Written last: a corpus without a manifest is never taken as complete.
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    replace_dir(staging, out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("data/bench_corpus"), help="corpus folder (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=2000, help="good JPEG files (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="class folders (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default: %(default)s)")
    parser.add_argument(
        "--corrupt", type=int, default=0, metavar="N", help="also write N undecodable .jpg files (default: 0)"
    )
    parser.add_argument(
        "--source-root",
        type=Path,
        action="append",
        help="where to look for wallpapers (repeatable; default: /usr/share/wallpapers and /usr/share/backgrounds)",
    )
    parser.add_argument(
        "--list-sources", action="store_true", help="print which wallpapers are used and why, then exit"
    )
    args = parser.parse_args(argv)
    for name in ("count", "classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.corrupt < 0:
        parser.error("--corrupt must not be negative")
    if not 1 <= args.quality <= 100:
        parser.error("--quality must be in 1..100")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    roots = args.source_root or list(SOURCE_ROOTS)
    candidates = classify(roots)
    if args.list_sources:
        for c in candidates:
            print(f"{'use ' if c.photograph else 'skip'}  {c.key:42s} {c.reason:32s} {c.path}")
        return 0
    sources = [c for c in candidates if c.photograph]
    if not sources:
        roots_text = ", ".join(str(r) for r in roots)
        print(
            f"error: no photographs found under {roots_text}; run `scripts/setup --wallpapers` "
            "(installs plasma-workspace-wallpapers and mate-backgrounds)",
            file=sys.stderr,
        )
        return 1
    params = parameters(args, sources)
    if corpus_is_complete(args.out, params):
        print(f"ok: bench corpus at {args.out} is complete ({args.count} files, seed {args.seed}; cached)")
        return 0
    if foreign_folder(args.out):
        print(f"error: {args.out} exists and has no {MANIFEST} from this script; not overwriting it", file=sys.stderr)
        return 1
    started = time.monotonic()
    build(args, sources, params)
    total = sum(p.stat().st_size for p in (args.out / "train").rglob("*") if p.is_file())
    corrupt = f" + {args.corrupt} corrupt" if args.corrupt else ""
    print(
        f"ok: wrote {args.count} JPEGs{corrupt} in {args.classes} classes from {len(sources)} photographs "
        f"to {args.out} ({total / 1e6:.1f} MB, {time.monotonic() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
