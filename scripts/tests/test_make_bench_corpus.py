"""Tests of scripts/make_bench_corpus.py on a fake wallpaper tree, so they need no wallpaper packages.

The fake photographs are not in KNOWN_PHOTOGRAPHS, so these runs exercise the EXIF fallback rule as well.
Run: .venv/bin/python -m unittest discover -s scripts/tests
"""

import contextlib
import hashlib
import io
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import make_bench_corpus as corpus

CAMERA_WALLPAPERS = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot"]


def write_jpeg(path: Path, pixels: np.ndarray, camera: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if camera is not None:
        exif[corpus.EXIF_MAKE_TAG] = camera
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)


def smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Many-coloured stand-in for a photograph: coarse noise upsampled, so it also compresses like one."""
    coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def make_fake_tree(root: Path) -> Path:
    """A /usr/share lookalike: plasma-style folders, one symlinked duplicate, and images each rule rejects."""
    rng = np.random.default_rng(7)
    wallpapers = root / "wallpapers"
    for name in CAMERA_WALLPAPERS:
        images = wallpapers / name / "contents" / "images"
        write_jpeg(images / "800x640.jpg", smooth_noise(rng, 640, 800), "TestCam")
        write_jpeg(images / "400x320.jpg", smooth_noise(rng, 320, 400), "TestCam")
        write_jpeg(images.parent / "screenshot.jpg", smooth_noise(rng, 320, 400), "TestCam")
    (wallpapers / "Alpha" / "contents" / "images" / "640x512.jpg").symlink_to("800x640.jpg")
    write_jpeg(wallpapers / "NoExif" / "contents" / "images" / "800x640.jpg", smooth_noise(rng, 640, 800), None)
    write_jpeg(
        wallpapers / "Flat" / "contents" / "images" / "800x640.jpg", np.full((640, 800, 3), 90, np.uint8), "TestCam"
    )
    write_jpeg(wallpapers / "Small" / "contents" / "images" / "500x400.jpg", smooth_noise(rng, 400, 500), "TestCam")
    (wallpapers / "Vector" / "contents" / "images").mkdir(parents=True)
    (wallpapers / "Vector" / "contents" / "images" / "vector.svg").write_text("<svg/>")
    return wallpapers


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = corpus.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


class WallpaperKeyTest(unittest.TestCase):
    def test_plasma_resolutions_share_the_package_name(self):
        root = Path("/usr/share/wallpapers")
        self.assertEqual(corpus.wallpaper_key(root / "Path/contents/images/2560x1600.jpg", root), "wallpapers/Path")
        self.assertEqual(corpus.wallpaper_key(root / "Path/contents/images/1280x800.jpg", root), "wallpapers/Path")

    def test_size_suffix_is_dropped_from_file_names(self):
        root = Path("/usr/share/backgrounds")
        self.assertEqual(
            corpus.wallpaper_key(root / "mate/abstract/Elephants_3840x2160.jpg", root),
            "backgrounds/mate/abstract/Elephants",
        )
        self.assertEqual(corpus.wallpaper_key(root / "mate/nature/Aqua.jpg", root), "backgrounds/mate/nature/Aqua")


class CorpusTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = Path(cls.tmp.name)
        cls.sources = make_fake_tree(cls.root / "share")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def build(self, out: Path, *extra: str) -> tuple[int, str, str]:
        return run(
            "--source-root",
            str(self.sources),
            "--out",
            str(out),
            "--count",
            "24",
            "--classes",
            "4",
            "--seed",
            "5",
            *extra,
        )

    def test_selection_rules(self):
        decisions = {c.key: c for c in corpus.classify([self.sources])}
        chosen = sorted(key for key, c in decisions.items() if c.photograph)
        self.assertEqual(chosen, [f"wallpapers/{name}" for name in CAMERA_WALLPAPERS])
        self.assertIn("no camera", decisions["wallpapers/NoExif"].reason)
        self.assertIn("distinct colours", decisions["wallpapers/Flat"].reason)
        self.assertIn("short side", decisions["wallpapers/Small"].reason)
        self.assertNotIn("wallpapers/Vector", decisions)
        # Of several resolutions the largest is used; the screenshot preview never is.
        self.assertEqual(decisions["wallpapers/Alpha"].size, (800, 640))

    def test_classes_draw_from_disjoint_sources(self):
        sources = [c for c in corpus.classify([self.sources]) if c.photograph]
        pools = corpus.class_sources(sources, 4)
        keys = [c.key for pool in pools for c in pool]
        self.assertEqual(sorted(keys), sorted(c.key for c in sources))
        self.assertTrue(all(pools))

    def test_layout_sizes_and_corrupt_files(self):
        out = self.root / "layout"
        code, stdout, _ = self.build(out, "--corrupt", "4")
        self.assertEqual(code, 0, stdout)
        files = sorted((out / "train").rglob("*.jpg"))
        good = [p for p in files if not p.name.startswith("corrupt_")]
        bad = [p for p in files if p.name.startswith("corrupt_")]
        self.assertEqual(len(good), 24)
        self.assertEqual(sorted({p.parent.name for p in good}), ["class_0", "class_1", "class_2", "class_3"])
        for class_dir in (out / "train").iterdir():
            self.assertEqual(len([p for p in class_dir.glob("*.jpg") if not p.name.startswith("corrupt_")]), 6)
        for path in good:
            with Image.open(path) as im:
                im.load()
                self.assertEqual(im.format, "JPEG")
                self.assertTrue(400 <= im.width <= 500 and 300 <= im.height <= 400, (path, im.size))
        self.assertEqual(len(bad), 4)
        self.assertEqual(
            sorted(p.name.split("_", 2)[2] for p in bad), sorted(f"{kind}.jpg" for kind in corpus.CORRUPTION_KINDS)
        )
        for path in bad:
            self.assertFalse(decodes(path), path)
        for path in (p for p in bad if "truncated" in p.name):
            data = path.read_bytes()
            self.assertTrue(data.startswith(b"\xff\xd8"), path)
            self.assertNotIn(b"\xff\xda", data, path)  # no scan data for a lenient decoder to fill in

    def test_same_seed_same_bytes_and_other_seed_differs(self):
        first, second, other = self.root / "seed_a", self.root / "seed_b", self.root / "seed_c"
        self.assertEqual(self.build(first)[0], 0)
        self.assertEqual(self.build(second)[0], 0)
        self.assertEqual(tree_digest(first), tree_digest(second))
        run("--source-root", str(self.sources), "--out", str(other), "--count", "24", "--classes", "4", "--seed", "6")
        self.assertNotEqual(
            tree_digest(first)["train/class_0/0_00000.jpg"], tree_digest(other)["train/class_0/0_00000.jpg"]
        )

    def test_complete_corpus_is_kept_and_a_changed_one_rebuilt(self):
        out = self.root / "idempotent"
        self.assertEqual(self.build(out)[0], 0)
        sample = out / "train" / "class_1" / "1_00000.jpg"
        stamp = sample.stat().st_mtime_ns
        code, stdout, _ = self.build(out)
        self.assertEqual(code, 0)
        self.assertIn("cached", stdout)
        self.assertEqual(sample.stat().st_mtime_ns, stamp)
        # A deleted file makes the corpus incomplete, so it is rebuilt.
        sample.unlink()
        code, stdout, _ = self.build(out)
        self.assertNotIn("cached", stdout)
        self.assertTrue(sample.is_file())
        code, stdout, _ = self.build(out, "--corrupt", "1")
        self.assertNotIn("cached", stdout)
        self.assertEqual(len(list((out / "train").rglob("corrupt_*"))), 1)

    def test_refuses_to_replace_a_folder_it_did_not_make(self):
        out = self.root / "foreign"
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        code, _, stderr = self.build(out)
        self.assertEqual(code, 1)
        self.assertIn("not overwriting", stderr)
        self.assertEqual((out / "notes.txt").read_text(), "keep me")

    def test_no_photographs_is_an_error_naming_the_fix(self):
        empty = self.root / "empty"
        empty.mkdir(exist_ok=True)
        code, _, stderr = run("--source-root", str(empty), "--out", str(self.root / "unused"))
        self.assertEqual(code, 1)
        self.assertIn("scripts/setup --wallpapers", stderr)


if __name__ == "__main__":
    unittest.main()
