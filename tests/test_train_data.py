"""Data for convattn train: the built-in cluttered shapes, CIFAR on-disk format, ImageFolder."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from convattn.train.data import ClutteredShapes, build_data, parse_data_spec

# Independent references for two class glyphs (7x7 strokes, as the docs describe them).
PLUS = np.zeros((7, 7), dtype=bool)
PLUS[3, :] = True
PLUS[:, 3] = True
CROSS = np.eye(7, dtype=bool) | np.eye(7, dtype=bool)[:, ::-1]


def _dihedral_set(mask: np.ndarray) -> list[np.ndarray]:
    out = []
    for flip in (False, True):
        m = mask[:, ::-1] if flip else mask
        out.extend(np.rot90(m, k) for k in range(4))
    return out


def test_shapes_are_deterministic_from_the_seed() -> None:
    a = ClutteredShapes(40, seed=3)
    b = ClutteredShapes(40, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, ClutteredShapes(40, seed=4).images)
    assert not torch.equal(a.images, ClutteredShapes(40, seed=3, split="val").images)
    assert a.images.dtype == torch.uint8 and a.images.shape == (40, 3, 32, 32)


def test_shapes_classes_are_balanced() -> None:
    data = ClutteredShapes(25, image_size=16, seed=1)
    counts = torch.bincount(data.targets, minlength=10)
    assert counts.sum() == 25 and counts.max() - counts.min() <= 1
    assert len(data.classes) == 10


@pytest.mark.parametrize(("name", "reference"), [("plus", PLUS), ("cross", CROSS)])
def test_shapes_label_is_the_glyph_in_the_target_box(name: str, reference: np.ndarray) -> None:
    data = ClutteredShapes(60, seed=0)
    label = data.classes.index(name)
    allowed = [m.copy() for m in _dihedral_set(reference)]
    checked = 0
    for image, target, box in zip(data.images, data.targets, data.boxes, strict=True):
        if int(target) != label:
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        assert (x1 - x0, y1 - y0) == (7, 7)
        patch = image[:, y0:y1, x0:x1].permute(1, 2, 0).reshape(-1, 3)
        colours, counts = torch.unique(patch, dim=0, return_counts=True)
        colour = colours[counts.argmax()]  # the glyph: one flat colour on a noisy background
        mask = (image[:, y0:y1, x0:x1] == colour.view(3, 1, 1)).all(0).numpy()
        assert any(np.array_equal(mask, m) for m in allowed), f"{name}: got\n{mask.astype(int)}"
        checked += 1
    assert checked >= 5


def test_shapes_getitem_normalizes_and_scales() -> None:
    data = ClutteredShapes(8, image_size=64, seed=0)
    image, label = data[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    raw = data.images[0].float() / 255
    torch.testing.assert_close(image, (raw - 0.5) / 0.166)
    assert label == int(data.targets[0])
    assert int(data.boxes[0, 2] - data.boxes[0, 0]) == 14  # glyphs scale with the image


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be a positive int"),
        ({"size": 4, "image_size": 8}, "image_size must be an int >= 12"),
        ({"size": 4, "split": "test"}, "split must be 'train' or 'val'"),
    ],
)
def test_shapes_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClutteredShapes(**kwargs)  # type: ignore[arg-type]


def test_parse_data_spec() -> None:
    assert parse_data_spec("CIFAR10") == ("cifar10", None)
    assert parse_data_spec("imagefolder:/x/y") == ("imagefolder", "/x/y")
    for bad in ("mnist", "imagefolder", "imagefolder:", "cifar10:/x", ""):
        with pytest.raises(ValueError, match="--data"):
            parse_data_spec(bad)


def _write_cifar(root: Path, fine: bool, per_file: int) -> np.ndarray:
    """Small fake data in the CIFAR python on-disk format; returns the test images (NHWC)."""
    rng = np.random.default_rng(0)
    labels_key = "fine_labels" if fine else "labels"
    classes = 100 if fine else 10
    if fine:
        folder = root / "cifar-100-python"
        files = {"train": per_file * 2, "test": per_file}
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    else:
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": per_file for i in range(1, 6)} | {"test_batch": per_file}
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    folder.mkdir(parents=True)
    test_images = np.empty(0)
    for name, count in files.items():
        data = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        entry = {"data": data, labels_key: rng.integers(0, classes, count).tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
        if name.startswith("test"):
            test_images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    with open(folder / meta[0], "wb") as handle:
        pickle.dump(meta[1], handle)
    return test_images


@pytest.mark.parametrize(
    ("kind", "fine", "train_len"), [("cifar10", False, 20), ("cifar100", True, 8)]
)
def test_cifar_reads_the_on_disk_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, fine: bool, train_len: int
) -> None:
    import torchvision.datasets.cifar as tv_cifar

    # The fake files cannot match the published MD5 sums; everything else is torchvision's.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    test_images = _write_cifar(tmp_path, fine, per_file=4)
    bundle = build_data(kind, data_dir=tmp_path)
    assert bundle.num_classes == (100 if fine else 10)
    assert len(bundle.train) == train_len and len(bundle.val) == 4  # type: ignore[arg-type]
    image, _ = bundle.val[1]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
    expected = (torch.from_numpy(test_images[1]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(image, expected)
    train_image, _ = bundle.train[0]
    assert train_image.shape == (3, 32, 32)


def test_cifar_missing_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--data cifar10: no readable CIFAR10 .*--download"):
        build_data("cifar10", data_dir=tmp_path)


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    bundle = build_data(f"imagefolder:{tmp_path}", image_size=16)
    assert bundle.classes == ["cat", "dog"] and bundle.num_classes == 2
    assert len(bundle.train) == 6 and len(bundle.val) == 4  # type: ignore[arg-type]
    image, label = bundle.val[3]
    assert image.shape == (3, 16, 16) and label == 1
    assert bundle.train[0][0].shape == (3, 16, 16)


def test_imagefolder_layout_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"expected the folder .*val"):
        build_data(f"imagefolder:{tmp_path}")
