"""Data: folder and CIFAR-pickle loading, the stratified split, augmentation, bad datasets."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.transforms import v2

from tests.conftest import write_cifar_pickles, write_folder
from vit.data import (
    AlternatingFlipSampler,
    Augment,
    BatchPipeline,
    DataError,
    ImageDataModule,
    build_batch_mix,
    build_train_transform,
    load_cifar10,
    load_image_folder,
    random_crop_flip,
    stratified_split,
)
from vit.errors import ConfigError


def test_folder_loads_sorted_classes_and_pixels(tmp_path):
    root = write_folder(tmp_path, n_train=5, n_test=0, classes=3)
    images, labels, classes = load_image_folder(root / "train", img_size=None)
    assert classes == ["class_0", "class_1", "class_2"]
    assert images.shape == (15, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    first = torchvision.io.decode_image(str(root / "train" / "class_0" / "0000.png"))
    assert torch.equal(images[0], first)


def test_folder_resizes_to_img_size(tmp_path):
    root = write_folder(tmp_path, n_train=2, n_test=0)
    images, _, _ = load_image_folder(root / "train", img_size=(8, 8))
    assert images.shape == (6, 3, 8, 8)


def test_cifar_pickle_layout(tmp_path, monkeypatch):
    write_cifar_pickles(tmp_path, n_per_class=2)
    # Our generated files cannot match torchvision's md5 list; everything else is torchvision's code.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    images, labels, classes = load_cifar10(str(tmp_path), train=True, download=False)
    assert images.shape == (5 * 20, 3, 32, 32) and classes[0] == "airplane" and len(classes) == 10
    test_images, test_labels, _ = load_cifar10(str(tmp_path), train=False, download=False)
    assert test_images.shape == (20, 3, 32, 32)
    # Channel-first conversion is right: class c was made brightest in channel c % 3.
    means = test_images.float().mean((2, 3))
    assert all(means[i].argmax() == test_labels[i] % 3 for i in range(len(test_labels)) if test_labels[i] < 3)
    dm = ImageDataModule(name="cifar10", root=str(tmp_path), download=False, val_size=10)
    dm.setup("fit")
    assert len(dm.train_set) == 90 and len(dm.val_set) == 10 and dm.has_test


def test_cifar10_missing_offline_names_the_folder_and_the_alternative(tmp_path):
    with pytest.raises(DataError, match=rf"not in {tmp_path}.*data=folder"):
        load_cifar10(str(tmp_path), train=True, download=False)


def test_stratified_split_is_seeded_disjoint_and_proportional():
    labels = torch.arange(4).repeat_interleave(25)  # 4 classes x 25
    tr, va = stratified_split(labels, 20, seed=1)
    assert len(va) == 20 and len(tr) == 80
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(set(tr.tolist()) | set(va.tolist())) == 100
    assert torch.bincount(labels[va]).tolist() == [5, 5, 5, 5]
    assert torch.equal(va, stratified_split(labels, 20, seed=1)[1])
    assert not torch.equal(va, stratified_split(labels, 20, seed=2)[1])
    with pytest.raises(DataError, match="val_size=100 must be in"):
        stratified_split(labels, 100, seed=0)


def test_train_transform_keeps_shape_and_dtype():
    augment = Augment(crop_padding=4, hflip=True, auto_augment="trivialaugment", random_erasing=0.5)
    t = build_train_transform((16, 16), augment)
    x = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    y = t(x)
    assert y.shape == (3, 16, 16) and y.dtype == torch.uint8
    assert build_train_transform((16, 16), Augment()) is None  # every augmentation is off unless asked for
    assert build_train_transform((16, 16), Augment(crop_padding=4, hflip=True, on_batch=True)) is None
    with pytest.raises(DataError, match="auto_augment"):
        build_train_transform((16, 16), Augment(auto_augment="autoaug2000"))
    for bad in (16, -1):
        with pytest.raises(DataError, match=rf"crop_padding={bad} must be in \[0, 16\)"):
            build_train_transform((16, 16), Augment(crop_padding=bad, on_batch=True))


def _window(padded: torch.Tensor, out: torch.Tensor, pad: int) -> tuple[int, int, bool] | None:
    """The (row, col, flipped) window of `padded` that `out` is, or None."""
    h, w = out.shape[-2:]
    for i in range(2 * pad + 1):
        for j in range(2 * pad + 1):
            win = padded[:, i : i + h, j : j + w]
            for flipped in (False, True):
                if torch.equal(out, win.flip(-1) if flipped else win):
                    return i, j, flipped
    return None


def test_random_crop_flip_draws_a_window_per_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (600, 3, 8, 6), dtype=torch.uint8)
    out = random_crop_flip(x, padding=2, hflip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # Each image is a window of its own reflect-padded copy, as v2.RandomCrop + flip would give ...
    padded = v2.functional.pad(x, [2], padding_mode="reflect")
    windows = [_window(padded[b], out[b], 2) for b in range(len(x))]
    assert None not in windows
    # ... and the windows are drawn per image: all 5 x 5 offsets and both flips occur, flips ~half.
    assert {(i, j) for i, j, _ in windows} == {(i, j) for i in range(5) for j in range(5)}
    assert 0.4 < sum(f for *_, f in windows) / len(windows) < 0.6
    assert torch.equal(random_crop_flip(x, padding=0, hflip=False), x)
    flipped_only = random_crop_flip(x.float(), padding=0, hflip=True)
    assert all(torch.equal(o, a) or torch.equal(o, a.flip(-1)) for o, a in zip(flipped_only, x.float()))


def test_on_batch_moves_crop_and_flip_from_the_loader_to_training_batches(folder_data):
    augment = {"crop_padding": 4, "hflip": True, "on_batch": True}
    dm = ImageDataModule(name="folder", root=str(folder_data), img_size=16, val_size=12, batch_size=8, augment=augment)
    dm.setup("fit")
    assert dm.train_set.transform is None  # nothing left to do per image
    images, labels = next(iter(dm.train_dataloader()))
    # The loader hands over the stored images untouched.
    assert all(any(torch.equal(img, stored) for stored in dm.train_set.images) for img in images)
    torch.manual_seed(1)
    dm.trainer = SimpleNamespace(training=False, callbacks=[])  # validation and test batches are left as they are
    out, _ = dm.on_after_batch_transfer((images, labels), 0)
    torch.testing.assert_close(out, dm.pipeline.normalize(images))
    dm.trainer = SimpleNamespace(training=True, callbacks=[])
    out, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert not torch.allclose(out, dm.pipeline.normalize(images))
    padded = v2.functional.pad(images, [4], padding_mode="reflect")
    std, mean = torch.tensor(dm.std).view(3, 1, 1), torch.tensor(dm.mean).view(3, 1, 1)
    uint8 = ((out * std + mean) * 255).round().to(torch.uint8)
    assert all(_window(padded[b], uint8[b], 4) is not None for b in range(len(images)))


def test_scheduled_resize_equals_normalizing_then_resizing():
    # The pipeline resizes before it normalizes (cheaper at small sizes); both are linear per
    # channel, so the batch is the one that normalizing the full-size images first would give.
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    pipeline = BatchPipeline(mean, std, img_size_schedule=[(0, 16), (0.5, 32)])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    small, _ = pipeline.train(images, torch.zeros(4, dtype=torch.long), fraction=0.2)
    expected = torch.nn.functional.interpolate(
        pipeline.normalize(images), size=(16, 16), mode="bilinear", antialias=True, align_corners=False
    )
    assert small.shape == (4, 3, 16, 16)
    torch.testing.assert_close(small, expected, atol=1e-5, rtol=0)
    full, _ = pipeline.train(images, torch.zeros(4, dtype=torch.long), fraction=0.7)
    assert torch.equal(full, pipeline.normalize(images))


def test_crop_padding_follows_its_schedule_and_needs_batch_crops():
    mean, std = [0.5] * 3, [0.25] * 3
    schedule = [(0.0, 0), (0.5, 3)]
    pipeline = BatchPipeline(mean, std, Augment(crop_padding=1, on_batch=True), crop_padding_schedule=schedule)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)
    # Padding 0 in the first half (the schedule wins over augment.crop_padding): the images as they are.
    early, _ = pipeline.train(images, labels, fraction=0.4)
    assert torch.equal(early, pipeline.normalize(images))
    # Padding 3 from half way: every image a window of its 3-padded self, and the offsets reach 3.
    late, _ = pipeline.train(images, labels, fraction=0.6)
    uint8 = (late * 0.25 + 0.5).mul(255).round().to(torch.uint8)
    padded = v2.functional.pad(images, [3], padding_mode="reflect")
    offsets = [_window(padded[b], uint8[b], 3) for b in range(len(images))]
    assert None not in offsets
    assert {0, 6} <= {i for i, _, _ in offsets}
    with pytest.raises(RuntimeError, match="need the run's progress"):
        pipeline.train(images, labels, fraction=None)
    # The loader's per-image crop cannot follow the clock: refused, not ignored.
    with pytest.raises(ConfigError, match="needs data.augment.on_batch=true"):
        BatchPipeline(mean, std, Augment(crop_padding=4), crop_padding_schedule=schedule)


def test_crop_padding_schedule_wider_than_the_images_is_refused_at_setup(folder_data):
    # A folder's image size is known only once it is read: the same range check as augment.crop_padding.
    dm = ImageDataModule(
        name="folder",
        root=str(folder_data),
        img_size=None,
        val_size=12,
        augment={"on_batch": True},
        crop_padding_schedule=[[0, 2], [0.5, 16]],
    )
    with pytest.raises(ConfigError, match=r"paddings \[16\] must be below 16 for \[16, 16\] images"):
        dm.setup("fit")


def test_batch_mix_gives_soft_targets_that_sum_to_one():
    mix = build_batch_mix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    x2, y2 = mix(x, y)
    assert x2.shape == x.shape and y2.shape == (8, 5)
    torch.testing.assert_close(y2.sum(1), torch.ones(8))
    assert build_batch_mix(5, 0.0, 0.0) is None


def test_datamodule_normalizes_on_device_with_recorded_stats(folder_data):
    dm = ImageDataModule(name="folder", root=str(folder_data), img_size=16, val_size=12, num_workers=0, batch_size=8)
    dm.setup("fit")
    assert dm.class_names == ["class_0", "class_1", "class_2"] and dm.num_classes == 3
    assert len(dm.train_set) == 108 and len(dm.val_set) == 12
    # Folder datasets get the training split's own statistics: normalized train images ~ N(0, 1).
    x = dm.pipeline.normalize(dm.train_set.images)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 16, 16)
    out, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda root: None, "does not exist"),
        (lambda root: (root / "train" / "a").mkdir(parents=True), "Found no valid file"),
        (lambda root: (root / "train").mkdir(parents=True), "Couldn't find any class folder"),
    ],
)
def test_bad_folders_raise_data_error(tmp_path, make, match):
    root = tmp_path / "ds"
    make(root)
    dm = ImageDataModule(name="folder", root=str(root))
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_empty_class_and_corrupt_image_are_named(tmp_path):
    root = write_folder(tmp_path / "ds", n_train=3, n_test=0)
    (root / "train" / "class_9").mkdir()
    with pytest.raises(DataError, match="class_9"):
        load_image_folder(root / "train", None)
    (root / "train" / "class_9").rmdir()
    bad = root / "train" / "class_1" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        load_image_folder(root / "train", None)


def test_test_split_must_have_the_same_classes(tmp_path):
    root = write_folder(tmp_path / "ds", n_train=3, n_test=2)
    Path(root / "test" / "class_0").rename(root / "test" / "zebra")
    dm = ImageDataModule(name="folder", root=str(root), val_size=3)
    with pytest.raises(DataError, match="has classes"):
        dm.setup("test")


def test_alternating_flip_shows_each_image_both_ways_in_consecutive_epochs():
    sampler = AlternatingFlipSampler(1000, seed=3)
    epochs = []
    for e in range(3):
        sampler.set_epoch(e)
        epochs.append(dict(sampler))  # index -> flip
    assert all(sorted(ep) == list(range(1000)) for ep in epochs)  # each a full pass
    assert 0.45 < sum(epochs[0].values()) / 1000 < 0.55  # a random half flipped first
    assert all(epochs[1][i] != epochs[0][i] and epochs[2][i] == epochs[0][i] for i in range(1000))
    # The order is shuffled anew each epoch, and the same on another rank (same seed and epoch).
    assert list(epochs[0]) != list(epochs[1])
    again = AlternatingFlipSampler(1000, seed=3)
    again.set_epoch(1)
    assert list(again) == list(epochs[1].items())
    # Without set_epoch, each pass counts as the next epoch.
    counting = AlternatingFlipSampler(1000, seed=3)
    assert [list(counting) for _ in range(2)] == [list(ep.items()) for ep in epochs[:2]]


def test_alternate_flip_flips_in_the_loader_and_not_again_on_the_batch(folder_data):
    augment = {"hflip": True, "alternate_flip": True, "on_batch": True}
    # 108 training images in batches of 12: no batch dropped, so every image is seen each epoch.
    dm = ImageDataModule(name="folder", root=str(folder_data), img_size=16, val_size=12, batch_size=12, augment=augment)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, AlternatingFlipSampler)
    dm.trainer = SimpleNamespace(training=True, callbacks=[])
    stored = dm.train_set.images  # random pixels (conftest): no image is its own mirror

    def index_of(img):
        return next(i for i, s in enumerate(stored) if torch.equal(s, img) or torch.equal(s, img.flip(-1)))

    seen = []  # per epoch: stored index -> the image as the loader gave it
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        # No crop, and no second (random) flip on the batch: the pipeline only normalizes.
        for images, labels in batches:
            x, _ = dm.on_after_batch_transfer((images, labels), 0)
            assert torch.equal(x, dm.pipeline.normalize(images))
        seen.append({index_of(img): img for images, _ in batches for img in images})
    assert sorted(seen[0]) == list(range(len(stored)))
    flipped = [not torch.equal(seen[0][i], stored[i]) for i in seen[0]]
    assert any(flipped) and not all(flipped)
    # Whichever way an image went in epoch 0, it goes the other way in epoch 1.
    assert all(torch.equal(seen[1][i], seen[0][i].flip(-1)) for i in seen[0])
    with pytest.raises(ConfigError, match="alternate_flip=true needs data.augment.hflip=true"):
        ImageDataModule(name="folder", root=str(folder_data), augment={"alternate_flip": True})
