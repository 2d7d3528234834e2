"""Same-machine baseline for benches/transforms.rs: the SimCLR and SwAV augmentation chains
written with the Pillow + numpy calls torchvision makes for PIL images (torchvision itself cannot
be imported in the CPU-only venv). Reports thread CPU time per image on the same synthetic
450x350 image, decode not included.

    .venv/bin/python trainer/benches/pil_baseline.py
"""

import math
import random
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def synthetic_image(w, h):
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(-16, 16, size=(h, w))
    r = x * 255 // w + noise
    g = y * 255 // h - noise
    b = (x + y) * 255 // (w + h) + noise // 2
    return Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8), "RGB")


def random_resized_crop(img, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    width, height = img.size
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = random.randint(0, height - h)
            j = random.randint(0, width - w)
            return img.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BILINEAR)
    return img.resize((size, size), Image.Resampling.BILINEAR)


def adjust_hue(img, factor):
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(factor * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def color_distortion(img):
    if random.random() < 0.8:
        ops = [
            lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(0.2, 1.8)),
            lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(0.2, 1.8)),
            lambda im: ImageEnhance.Color(im).enhance(random.uniform(0.2, 1.8)),
            lambda im: adjust_hue(im, random.uniform(-0.2, 0.2)),
        ]
        random.shuffle(ops)
        for op in ops:
            img = op(img)
    if random.random() < 0.2:
        gray = np.array(img.convert("L"), dtype=np.uint8)
        img = Image.fromarray(np.dstack([gray, gray, gray]), "RGB")
    return img


def view(img, size, scale):
    img = random_resized_crop(img, size, scale)
    if random.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = color_distortion(img)
    if random.random() <= 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    arr = np.asarray(img).transpose(2, 0, 1).astype(np.float32) / 255
    return (arr - MEAN) / STD


def simclr(img):
    return [view(img.copy(), 224, (0.08, 1.0)) for _ in range(2)]


def swav(img):
    return [view(img, 224, (0.14, 1.0)) for _ in range(2)] + [view(img, 96, (0.05, 0.14)) for _ in range(6)]


def per_image(fn, img, seconds=3.0):
    random.seed(0)
    for _ in range(5):
        fn(img)
    start, n = time.thread_time(), 0
    while time.thread_time() - start < seconds:
        fn(img)
        n += 1
    return (time.thread_time() - start) / n


if __name__ == "__main__":
    img = synthetic_image(450, 350)
    for name, fn in [("SimCLR 2x224", simclr), ("SwAV 2x224+6x96", swav)]:
        t = per_image(fn, img)
        print(f"{name:<20} {t * 1e6:9.1f} us/img {1 / t:7.0f} img/s  (Pillow + numpy, thread CPU time)")
