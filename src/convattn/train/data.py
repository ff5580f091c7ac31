"""Data for ``convattn train``: CIFAR-10/100, ImageFolder trees and the built-in cluttered
shapes data set.

Data specs (``--data``):

- ``shapes`` (the default): :class:`ClutteredShapes`, generated in memory from a seed, no
  download. The class is the one *target* glyph in the image; distractor glyphs made of the
  same strokes (corners, tees, arcs, bars) surround it on a striped, noisy background, so a
  network has to find *where* the target is before it can say *what* it is.
- ``cifar10`` / ``cifar100``: ``torchvision.datasets.CIFAR10/100`` under ``--data-dir``,
  with the standard recipe's augmentation (pad 4 + random 32 crop + horizontal flip) and
  normalisation (mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)).
- ``imagefolder:PATH``: ``torchvision.datasets.ImageFolder`` on ``PATH/train/CLASS/*`` and
  ``PATH/val/CLASS/*`` with random-resized-crop + flip for training and resize + centre crop
  for validation, ImageNet normalisation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClutteredShapes",
    "DataBundle",
    "build_data",
    "parse_data_spec",
]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of ClutteredShapes images (measured on 10,000 32x32 images, seed 0:
# mean 0.500, std 0.166 in every channel).
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.166, 0.166, 0.166)

# 7x7 stroke glyphs. Every class glyph is drawn from the same strokes as the distractors
# (lines, diagonals, corners, arcs), so local statistics do not give the class away.
_CLASS_GLYPHS: dict[str, tuple[str, ...]] = {
    "plus": ("...#...", "...#...", "...#...", "#######", "...#...", "...#...", "...#..."),
    "cross": ("#.....#", ".#...#.", "..#.#..", "...#...", "..#.#..", ".#...#.", "#.....#"),
    "ring": ("..###..", ".#...#.", "#.....#", "#.....#", "#.....#", ".#...#.", "..###.."),
    "square": ("#######", "#.....#", "#.....#", "#.....#", "#.....#", "#.....#", "#######"),
    "triangle": ("...#...", "..#.#..", "..#.#..", ".#...#.", ".#...#.", "#.....#", "#######"),
    "diamond": ("...#...", "..#.#..", ".#...#.", "#.....#", ".#...#.", "..#.#..", "...#..."),
    "h": ("#.....#", "#.....#", "#.....#", "#######", "#.....#", "#.....#", "#.....#"),
    "arrow": ("...#...", "..###..", ".#.#.#.", "#..#..#", "...#...", "...#...", "...#..."),
    "zigzag": ("#######", ".....#.", "....#..", "...#...", "..#....", ".#.....", "#######"),
    "grid": (".#...#.", "#######", ".#...#.", ".#...#.", ".#...#.", "#######", ".#...#."),
}
_DISTRACTOR_GLYPHS: dict[str, tuple[str, ...]] = {
    "corner": ("#......", "#......", "#......", "#......", "#......", "#......", "#######"),
    "tee": ("#######", "...#...", "...#...", "...#...", "...#...", "...#...", "...#..."),
    "diagonal": ("#......", ".#.....", "..#....", "...#...", "....#..", ".....#.", "......#"),
    "vee": ("#.....#", ".#...#.", ".#...#.", "..#.#..", "..#.#..", "...#...", "...#..."),
    "arc": ("..###..", ".#...#.", "#.....#", "#.....#", "#.....#", ".......", "......."),
    "bars": (".......", "#######", ".......", ".......", ".......", "#######", "......."),
}
_GLYPH_SIZE = 7


def _bitmaps(glyphs: dict[str, tuple[str, ...]]) -> np.ndarray:
    return np.stack(
        [
            np.array([[c == "#" for c in row] for row in rows], dtype=bool)
            for rows in glyphs.values()
        ]
    )


def _dihedral(mask: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/reflections of a square mask (k in 0..7)."""
    out = np.rot90(mask, k % 4)
    return out[:, ::-1] if k >= 4 else out


class ClutteredShapes(Dataset[tuple[torch.Tensor, int]]):
    """Procedural images: one small target glyph among distractor glyphs on a textured
    background; the label is the target's class.

    Each image has a background of a random base colour plus a sinusoidal grating (random
    orientation, period 2-7 px, i.e. stroke-like) and Gaussian noise. On it are the target
    (one of 10 class glyphs: ``plus``, ``cross``, ``ring``, ``square``, ``triangle``,
    ``diamond``, ``h``, ``arrow``, ``zigzag``, ``grid``) and several distractors (``corner``,
    ``tee``, ``diagonal``, ``vee``, ``arc``, ``bars``: parts of class glyphs), each at a random
    position without overlapping another glyph, in a random one of the 8 rotations/reflections
    and in a random saturated colour. Glyphs are 7 px at 32 px images and scale with the image
    size; the number of distractors scales with the area. Classes are balanced (the counts
    differ by at most one).

    Args:
        size: number of images.
        image_size: side of the square images (>= 12).
        seed: images are a deterministic function of ``(seed, split)``.
        split: ``"train"`` or ``"val"`` (independent streams for the same seed).
        normalize: subtract :data:`SHAPES_MEAN` and divide by :data:`SHAPES_STD` in
            ``__getitem__``.

    Attributes:
        images: ``uint8`` tensor ``(size, 3, image_size, image_size)``.
        targets: ``int64`` tensor ``(size,)``.
        boxes: ``int64`` tensor ``(size, 4)``: the target's ``(x0, y0, x1, y1)``, exclusive end.
        classes: the class names, index = label.
    """

    classes: ClassVar[list[str]] = list(_CLASS_GLYPHS)

    def __init__(
        self,
        size: int,
        *,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        normalize: bool = True,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"ClutteredShapes: size must be a positive int, got {size!r}")
        if not isinstance(image_size, int) or image_size < 12:
            raise ValueError(
                f"ClutteredShapes: image_size must be an int >= 12, got {image_size!r}"
            )
        if split not in ("train", "val"):
            raise ValueError(f"ClutteredShapes: split must be 'train' or 'val', got {split!r}")
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.normalize = normalize
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        images, targets, boxes = _generate(rng, size, image_size)
        self.images = torch.from_numpy(images)
        self.targets = torch.from_numpy(targets)
        self.boxes = torch.from_numpy(boxes)
        self._mean = torch.tensor(SHAPES_MEAN).view(3, 1, 1)
        self._std = torch.tensor(SHAPES_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255)
        if self.normalize:
            image = (image - self._mean) / self._std
        return image, int(self.targets[index])


def _generate(
    rng: np.random.Generator, size: int, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = max(1, round(image_size / 32))
    glyph = _GLYPH_SIZE * scale
    class_masks = _bitmaps(_CLASS_GLYPHS)
    distractor_masks = _bitmaps(_DISTRACTOR_GLYPHS)
    if scale > 1:
        class_masks = class_masks.repeat(scale, 1).repeat(scale, 2)
        distractor_masks = distractor_masks.repeat(scale, 1).repeat(scale, 2)
    most = max(1, int((image_size / glyph) ** 2 * 0.25))
    fewest = max(1, math.ceil(most / 2))

    num_classes = len(class_masks)
    targets = rng.permutation(np.arange(size) % num_classes).astype(np.int64)
    images = np.empty((size, 3, image_size, image_size), dtype=np.uint8)
    boxes = np.empty((size, 4), dtype=np.int64)
    chunk = 1024
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        # Background: base colour + oriented grating + noise, in [0, 1].
        base = rng.uniform(0.35, 0.65, (n, 3, 1, 1)).astype(np.float32)
        theta = rng.uniform(0, np.pi, (n, 1, 1)).astype(np.float32)
        period = (rng.uniform(2.0, 7.0, (n, 1, 1)) * scale).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        amplitude = rng.uniform(0.05, 0.2, (n, 3, 1, 1)).astype(np.float32)
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period) + phase)[
            :, None
        ]
        noise = rng.normal(0.0, 0.05, (n, 3, image_size, image_size)).astype(np.float32)
        canvas = base + amplitude * wave + noise
        for i in range(n):
            label = int(targets[start + i])
            placed: list[tuple[int, int]] = []
            count = int(rng.integers(fewest, most + 1))
            kinds = [class_masks[label]] + [
                distractor_masks[int(rng.integers(len(distractor_masks)))] for _ in range(count)
            ]
            for j, mask in enumerate(kinds):
                position = _free_position(rng, placed, image_size, glyph)
                if position is None:
                    continue  # no room left: fewer distractors in this image
                y, x = position
                placed.append(position)
                mask = _dihedral(mask, int(rng.integers(8)))
                # A saturated colour: each channel dark or bright.
                colour = np.where(
                    rng.random(3) < 0.5, rng.uniform(0.0, 0.2, 3), rng.uniform(0.8, 1.0, 3)
                ).astype(np.float32)
                region = canvas[i, :, y : y + glyph, x : x + glyph]
                region[:, mask] = colour[:, None]
                if j == 0:
                    boxes[start + i] = (x, y, x + glyph, y + glyph)
        images[start : start + n] = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, targets, boxes


def _free_position(
    rng: np.random.Generator, placed: list[tuple[int, int]], image_size: int, glyph: int
) -> tuple[int, int] | None:
    """A random top-left corner whose glyph box (plus a 1 px margin) overlaps no placed box."""
    for _ in range(30):
        y, x = (int(v) for v in rng.integers(0, image_size - glyph + 1, 2))
        if all(abs(y - py) > glyph or abs(x - px) > glyph for py, px in placed):
            return y, x
    return None


@dataclass
class DataBundle:
    """What :func:`build_data` returns: the two splits and what a model needs to know."""

    train: Dataset[Any]
    val: Dataset[Any]
    num_classes: int
    image_size: int
    classes: list[str]
    name: str


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10"`` -> ``("cifar10", None)``; ``"imagefolder:/data"`` -> ``("imagefolder",
    "/data")``. Raises ValueError for an unknown kind."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--data: expected a data spec string, got {spec!r}")
    kind, sep, path = spec.partition(":")
    kind = kind.lower()
    if kind == "imagefolder":
        if not sep or not path:
            raise ValueError("--data: imagefolder needs a path, as in 'imagefolder:/data/pets'")
        return kind, path
    if kind in ("cifar10", "cifar100", "shapes") and not sep:
        return kind, None
    raise ValueError(
        f"--data: expected 'shapes', 'cifar10', 'cifar100' or 'imagefolder:PATH', got {spec!r}"
    )


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - the train extra installs it
        raise ValueError(
            "--data cifar10/cifar100/imagefolder needs torchvision: pip install 'convattn[train]'"
        ) from exc
    return torchvision


def _cifar(kind: str, data_dir: str, download: bool, image_size: int) -> DataBundle:
    tv = _torchvision()
    transforms = tv.transforms
    resize = [] if image_size == 32 else [transforms.Resize(image_size)]
    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    train_tf = transforms.Compose(
        [
            *resize,
            transforms.RandomCrop(image_size, padding=4 * max(1, image_size // 32)),
            transforms.RandomHorizontalFlip(),
            *normalize,
        ]
    )
    val_tf = transforms.Compose([*resize, *normalize])
    cls = tv.datasets.CIFAR10 if kind == "cifar10" else tv.datasets.CIFAR100
    folder = Path(data_dir) / cls.base_folder
    try:
        train = cls(data_dir, train=True, transform=train_tf, download=download)
        val = cls(data_dir, train=False, transform=val_tf, download=download)
    except RuntimeError as exc:
        hint = (
            "the download failed (offline?)"
            if download
            else "pass --download to fetch it (about 170 MB)"
        )
        raise ValueError(
            f"--data {kind}: no readable {kind.upper()} in {folder} ({exc}); {hint}, or put "
            f"the extracted '{cls.base_folder}' folder under --data-dir"
        ) from exc
    except OSError as exc:  # network errors during download
        raise ValueError(f"--data {kind}: download to {data_dir} failed: {exc}") from exc
    return DataBundle(train, val, len(train.classes), image_size, list(train.classes), kind)


def _imagefolder(path: str, image_size: int) -> DataBundle:
    tv = _torchvision()
    transforms = tv.transforms
    root = Path(path)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(
                f"--data imagefolder:{path}: expected the folder {root / split} "
                "(layout PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg)"
            )
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            *normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            *normalize,
        ]
    )
    try:
        train = tv.datasets.ImageFolder(os.fspath(root / "train"), transform=train_tf)
        val = tv.datasets.ImageFolder(os.fspath(root / "val"), transform=val_tf)
    except FileNotFoundError as exc:
        raise ValueError(f"--data imagefolder:{path}: {exc}") from exc
    if train.classes != val.classes:
        raise ValueError(
            f"--data imagefolder:{path}: train and val have different class folders: "
            f"{train.classes} vs {val.classes}"
        )
    return DataBundle(
        train, val, len(train.classes), image_size, list(train.classes), "imagefolder"
    )


def build_data(
    spec: str = "shapes",
    *,
    data_dir: str | os.PathLike[str] = "data",
    download: bool = False,
    image_size: int | None = None,
    train_size: int = 10_000,
    val_size: int = 2_000,
    seed: int = 0,
) -> DataBundle:
    """Training and validation sets for a data spec (see the module docstring).

    ``image_size`` defaults to 32 for ``shapes`` and CIFAR, 224 for ImageFolder.
    ``train_size``/``val_size``/``seed`` only apply to ``shapes`` (the data seed is the run
    seed, so two seeds of a benchmark see different images).
    """
    kind, path = parse_data_spec(spec)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ValueError(f"--image-size: expected an int >= 8, got {image_size!r}")
    if kind == "shapes":
        size = image_size or 32
        for name, value in (("--train-size", train_size), ("--val-size", val_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        train = ClutteredShapes(train_size, image_size=size, seed=seed, split="train")
        val = ClutteredShapes(val_size, image_size=size, seed=seed, split="val")
        return DataBundle(train, val, len(ClutteredShapes.classes), size, train.classes, kind)
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, os.fspath(data_dir), download, image_size or 32)
    return _imagefolder(path or "", image_size or 224)
