"""Data: CIFAR-10 (torchvision) or any class-folder tree, decoded once into uint8 memory, and the
one pipeline every batch goes through on the device.

Images live in memory as one uint8 tensor (N, C, H, W): CIFAR-10's 50,000 training images are
150 MB. Per-image augmentation (torchvision.transforms.v2: RandAugment, erasing, and crop + flip
unless `augment.on_batch`) runs on those uint8 tensors in the loader. Everything else happens to
whole batches once they reach the device, in `BatchPipeline`: for training batches crop + flip
(`augment.on_batch`; the crop's padding on a schedule if one is set) -> resize to the scheduled
size -> normalize -> mixup/cutmix; evaluation batches are only normalized, with the same
`normalize` that vit-eval, vit-attention, vit-predict and export use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from vit.errors import ConfigError, DataError
from vit.schedule import RunClock, img_size_at, parse_crop_padding_schedule, parse_img_size_schedule, value_at

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = ("cifar10", "folder")
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) and labels (N,) in memory, with an optional per-image transform.

    An index is an int, or an (int, flip) pair from `AlternatingFlipSampler`: flipped before the transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int | tuple[int, bool]) -> tuple[torch.Tensor, int]:
        i, flip = i if isinstance(i, tuple) else (i, False)
        img = self.images[i].flip(-1) if flip else self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


class AlternatingFlipSampler(Sampler[tuple[int, bool]]):
    """A shuffled pass over `n` images per epoch, each index paired with whether to flip it
    horizontally: image i is flipped in epoch e when first_flip[i] XOR (e is odd) (airbench's
    alternating flip). A random half is flipped in epoch 0, and every image is seen both ways in any
    two consecutive epochs, where an independent coin per epoch shows it the same way twice half the time.

    The order and the first flips depend only on (seed, epoch), so DDP ranks agree (Lightning
    shards this sampler's output); Lightning calls `set_epoch` at each epoch's start, which also
    keeps the alternation on resume. Iterated without it, each pass counts as the next epoch.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.first_flip = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5  # (n,) bool

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & 0xFFFF_FFFF_FFFF)  # the same on every rank
        order = torch.randperm(self.n, generator=g)
        flips = self.first_flip[order] ^ bool(self.epoch % 2)
        self.epoch += 1
        return zip(order.tolist(), flips.tolist())


def batch_size(batch: tuple[torch.Tensor, Any]) -> int:
    """Images in an (images, labels) batch; for Lightning's ThroughputMonitor."""
    return batch[0].shape[0]


# -- reading datasets -----------------------------------------------------------------------


def load_cifar10(root: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """torchvision's CIFAR-10 as uint8 (N, 3, 32, 32), labels, class names."""
    split = "train" if train else "test"
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except Exception as e:  # offline download (URLError), or absent with download=False (RuntimeError)
        raise DataError(
            f"CIFAR-10 ({split} split) is not in {os.path.abspath(root)} and could not be "
            f"{'downloaded' if download else 'loaded (data.download=false)'}: {e}. "
            "Connect to the internet so torchvision can download it, point data.root at a folder "
            "that holds cifar-10-batches-py/, or use a class-folder copy with "
            "data=folder data.root=<dir with train/<class>/*.png>."
        ) from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)


def read_image(path: str | os.PathLike, img_size: Sequence[int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode an image file to uint8 RGB (3, H, W), resized to `img_size` when given.

    Returns the image and its original (H, W). Grayscale, palette and RGBA files become RGB.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)  # (3, H, W) uint8
    except Exception as e:
        raise DataError(f"cannot decode image {path}: {e}; delete or replace the file") from e
    original = (int(img.shape[1]), int(img.shape[2]))
    if img_size is not None and original != tuple(img_size):
        img = v2.functional.resize(img, list(img_size), antialias=True)
    return img, original


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W), or float in 0-255 -> float32, (x/255 - mean) / std per channel."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def load_image_folder(
    folder: str | Path, img_size: tuple[int, int] | None, class_names: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A `folder/<class>/*.png|jpg|...` tree as uint8 (N, 3, H, W), labels, sorted class names.

    Images are resized to `img_size` when given; otherwise they must all share one size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; expected {folder}/<class>/<image files>")
    try:
        ds = torchvision.datasets.ImageFolder(str(folder), allow_empty=False)
    except FileNotFoundError as e:  # no class folders, or a class folder with no images
        raise DataError(f"{folder}: {e}. Each class needs at least one image file.") from e
    if class_names is not None and list(ds.classes) != list(class_names):
        raise DataError(f"{folder} has classes {ds.classes}, but the training split has {list(class_names)}")
    first = read_image(ds.samples[0][0], img_size)[0]
    size = tuple(first.shape[1:])
    images = torch.empty(len(ds.samples), 3, *size, dtype=torch.uint8)

    def decode_into(i: int) -> None:
        path = ds.samples[i][0]
        img = read_image(path, img_size)[0]
        if tuple(img.shape[1:]) != size:
            raise DataError(
                f"{path} is {tuple(img.shape[1:])}, other images are {size}; set data.img_size to resize all"
            )
        images[i] = img

    # torchvision's decoders release the GIL: threads decode in parallel (50,000 JPEGs in seconds).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode_into, range(len(ds.samples))))
    return images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units, in chunks so a
    large dataset is never converted to float all at once."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].double().div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    n = images.numel() // images.shape[1]
    mean = total / n
    std = (squares / n - mean.square()).clamp(min=0).mul(n / max(n - 1, 1)).sqrt()  # unbiased, like Tensor.std
    return mean.tolist(), std.tolist()


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `val_size` samples drawn per class in proportion, seeded."""
    n = len(labels)
    if not 0 <= val_size < n:
        raise DataError(f"data.val_size={val_size} must be in [0, {n}) for a training set of {n} images")
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    # Largest-remainder allocation so the per-class quotas add up to val_size exactly.
    exact = counts.double() * val_size / n
    quota = exact.floor().long()
    quota[torch.argsort(exact - quota, descending=True)[: val_size - int(quota.sum())]] += 1
    val = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        val.append(idx[torch.randperm(len(idx), generator=g)[:q]])
    val_idx = torch.cat(val).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).flatten(), val_idx


# -- augmentation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Training augmentation (`data.augment.*`). Every field is off by default: the recipes live
    in the YAML configs, not here. `on_batch` moves crop + flip from the loader to whole batches;
    `alternate_flip` (with `hflip`) replaces the random flip by `AlternatingFlipSampler`'s."""

    crop_padding: int = 0
    hflip: bool = False
    alternate_flip: bool = False
    auto_augment: str = "none"  # none | randaugment | trivialaugment
    randaugment_num_ops: int = 2  # torchvision's RandAugment defaults
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    on_batch: bool = False

    @property
    def random_flip(self) -> bool:
        """A coin per image per epoch (the loader's or the batch's); the alternating flip is the sampler's."""
        return self.hflip and not self.alternate_flip


def build_train_transform(img_size: Sequence[int], augment: Augment) -> v2.Transform | None:
    """The per-image part of training augmentation, on uint8 tensors (None: nothing to do).

    With `augment.on_batch`, the crop and flip are left to `BatchPipeline` (after these ops)."""
    a = augment
    if not 0 <= a.crop_padding < min(img_size):
        raise DataError(
            f"data.augment.crop_padding={a.crop_padding} must be in [0, {min(img_size)}) for {list(img_size)} images "
            "(reflect padding takes at most image size - 1 pixels)"
        )
    if a.auto_augment not in AUTO_AUGMENTS:
        raise DataError(f"data.augment.auto_augment must be one of {AUTO_AUGMENTS}, got {a.auto_augment!r}")
    ops: list[v2.Transform] = []
    if a.crop_padding and not a.on_batch:
        ops.append(v2.RandomCrop(list(img_size), padding=a.crop_padding, padding_mode="reflect"))
    if a.random_flip and not a.on_batch:
        ops.append(v2.RandomHorizontalFlip())
    if a.auto_augment == "randaugment":
        ops.append(v2.RandAugment(num_ops=a.randaugment_num_ops, magnitude=a.randaugment_magnitude))
    elif a.auto_augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide())
    if a.random_erasing > 0:
        ops.append(v2.RandomErasing(p=a.random_erasing, value=0))
    return v2.Compose(ops) if ops else None


def random_crop_flip(images: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """v2.RandomCrop(padding, reflect) + v2.RandomHorizontalFlip, drawn per image, on a whole batch.

    torchvision's v2 transforms draw one set of parameters per call, so a batch would share one
    crop; here every image gets its own offset and flip, gathered in one indexing op. The same
    distribution as the per-image transforms, ~15x cheaper than calling them per image on the CPU.
    images: (B, C, H, W) of any dtype -> (B, C, H, W).
    """
    B, _, H, W = images.shape
    device = images.device
    if padding:
        images = F.pad(images, (padding,) * 4, mode="reflect")
    rows = torch.randint(0, 2 * padding + 1, (B, 1), device=device) + torch.arange(H, device=device)  # (B, H)
    cols = torch.randint(0, 2 * padding + 1, (B, 1), device=device) + torch.arange(W, device=device)  # (B, W)
    if hflip:
        cols = torch.where(torch.rand(B, 1, device=device) < 0.5, cols.flip(1), cols)
    b = torch.arange(B, device=device).view(B, 1, 1)
    # (B, H', W', C)[b, rows, cols] -> (B, H, W, C): image b's rows x cols window.
    return images.permute(0, 2, 3, 1)[b, rows.view(B, H, 1), cols.view(B, 1, W)].permute(0, 3, 1, 2)


def build_batch_mix(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> v2.Transform | None:
    """Batch-level MixUp / CutMix (one of them per batch), producing soft targets (B, K)."""
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


class BatchPipeline:
    """What a batch goes through once it is on the device, in one place.

    Training batches: random crop + flip (when `augment.on_batch`; the crop's padding is
    `augment.crop_padding`, or what `crop_padding_schedule` gives at this point of the run) ->
    resize to the size that `img_size_schedule` gives -> normalize -> MixUp/CutMix.
    Evaluation batches: normalize only (full size, no augmentation).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment = Augment(),
        img_size_schedule: Sequence[tuple[float, int]] = (),
        batch_mix: v2.Transform | None = None,
        crop_padding_schedule: Sequence[tuple[float, int]] = (),
    ) -> None:
        self.mean, self.std = list(mean), list(std)
        self.augment, self.img_size_schedule, self.batch_mix = augment, list(img_size_schedule), batch_mix
        if crop_padding_schedule and not augment.on_batch:
            # The loader's per-image transforms are built once (and copied into worker processes):
            # only the batch crop can follow the run's clock.
            raise ConfigError("data.crop_padding_schedule needs data.augment.on_batch=true")
        self.crop_padding_schedule = list(crop_padding_schedule)

    def train(
        self, images: torch.Tensor, labels: torch.Tensor, fraction: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W), labels (B,) at `fraction` of the run -> float (B, C, h, w), labels
        (B,) or soft targets (B, K) when a batch mix is on."""
        if (self.img_size_schedule or self.crop_padding_schedule) and fraction is None:
            raise RuntimeError(
                "data.img_size_schedule and data.crop_padding_schedule need the run's progress: train through vit.module"
            )
        if self.augment.on_batch:
            padding = self.augment.crop_padding
            if self.crop_padding_schedule:
                padding = int(value_at(fraction, self.crop_padding_schedule))
            images = random_crop_flip(images, padding, self.augment.random_flip)
        x = images.float()  # 0-255
        if self.img_size_schedule:
            size = img_size_at(fraction, self.img_size_schedule)
            if size is not None and (size, size) != tuple(x.shape[-2:]):
                # Downscale the whole batch (antialiased), so early steps see fewer patch tokens. Before
                # normalizing: the resize's weights sum to one, so the two commute (up to float rounding),
                # and at 16 px a quarter of the pixels is left to normalize (~4% of a 16 px step).
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = self.normalize(x)
        if self.batch_mix is not None:
            x, labels = self.batch_mix(x, labels)  # labels -> soft targets (B, K)
        return x, labels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, normalized: the evaluation batches' whole pipeline."""
        return normalize(images, self.mean, self.std)


# -- the DataModule -------------------------------------------------------------------------


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10 or a class-folder dataset; train/val split carved from train, seeded.

    `mean`/`std` default to CIFAR-10's for `cifar10` and to the training split's own statistics
    for `folder`. Building one reads nothing but the class-folder names, so the network can be
    sized from `class_names` and `img_size` before any image is decoded; Lightning calls
    `prepare_data` (downloads, once per node) and `setup`. What a checkpoint needs to preprocess
    and to rebuild the split (class names, normalization, size, source) is this module's
    `state_dict`, which Lightning stores in every checkpoint.
    """

    def __init__(
        self,
        name: str = "cifar10",
        root: str = "data/cifar10",
        download: bool = True,
        img_size: int | Sequence[int] | None = 32,
        val_size: int = 5000,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: dict[str, Any] | Augment | None = None,
        mix: dict[str, Any] | None = None,
        img_size_schedule: Sequence[Sequence[float]] | None = None,
        crop_padding_schedule: Sequence[Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        if name not in DATASETS:
            raise DataError(f"data.name must be one of {DATASETS}, got {name!r}")
        # expanduser: a quoted "~/..." in YAML or on the command line (Hydra does not accept an unquoted ~).
        self.name, self.root, self.download = name, os.path.expanduser(root), download
        self._img_size = (img_size, img_size) if isinstance(img_size, int) else (tuple(img_size) if img_size else None)
        self.val_size, self.seed = val_size, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.mean = list(mean) if mean is not None else (list(CIFAR10_MEAN) if name == "cifar10" else None)
        self.std = list(std) if std is not None else (list(CIFAR10_STD) if name == "cifar10" else None)
        self.augment = augment if isinstance(augment, Augment) else Augment(**(augment or {}))
        if self.augment.alternate_flip and not self.augment.hflip:
            raise ConfigError("data.augment.alternate_flip=true needs data.augment.hflip=true (it is a way to flip)")
        self.mix = dict(mix or {})
        self.img_size_schedule = parse_img_size_schedule(img_size_schedule)
        self.crop_padding_schedule = parse_crop_padding_schedule(crop_padding_schedule)
        self._class_names: list[str] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.pipeline: BatchPipeline | None = None

    # -- what the network is sized from, known before any image is decoded --------------------
    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = list(CIFAR10_CLASSES) if self.name == "cifar10" else self._folder_classes()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def img_size(self) -> tuple[int, int]:
        """(H, W) of the images the network sees: data.img_size, or a folder's first image's size."""
        if self._img_size is None:
            first = next(p for p in sorted((Path(self.root) / "train" / self.class_names[0]).iterdir()) if p.is_file())
            self._img_size = read_image(first)[1]  # its original (H, W)
        return self._img_size

    def _folder_classes(self) -> list[str]:
        train = Path(self.root) / "train"
        if not Path(self.root).is_dir():
            raise DataError(f"data.root={self.root} does not exist; expected {self.root}/train/<class>/<images>")
        if not train.is_dir():
            raise DataError(f"{self.root} has no train/ folder; expected {self.root}/train/<class>/<images>")
        try:
            return list(find_classes(str(train))[0])
        except FileNotFoundError as e:
            raise DataError(f"{train}: {e}. Each class needs a folder of images.") from e

    @property
    def has_test(self) -> bool:
        if self.name == "cifar10":
            return True
        return (Path(self.root) / "test").is_dir()

    # -- Lightning's data hooks --------------------------------------------------------------
    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, so DDP ranks never download at once.
        if self.name == "cifar10" and self.download:
            load_cifar10(self.root, train=True, download=True)
            load_cifar10(self.root, train=False, download=True)

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if self.name == "cifar10":
            images, labels, classes = load_cifar10(self.root, train=train, download=False)
            if tuple(images.shape[2:]) != self.img_size:
                images = v2.functional.resize(images, list(self.img_size), antialias=True)
            return images, labels, classes
        split = Path(self.root) / ("train" if train else "test")
        return load_image_folder(split, self._img_size, self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            images, labels, classes = self._load(train=True)
            if classes != self.class_names:
                raise DataError(f"{self.root} has classes {classes}, expected {self.class_names}")
            self._img_size = tuple(images.shape[2:])
            train_idx, val_idx = stratified_split(labels, self.val_size, self.seed)
            if self.mean is None or self.std is None:
                self.mean, self.std = channel_stats(images[train_idx])
            transform = build_train_transform(self.img_size, self.augment)
            too_wide = [p for _, p in self.crop_padding_schedule if p >= min(self.img_size)]
            if too_wide:
                raise ConfigError(
                    f"data.crop_padding_schedule paddings {too_wide} must be below {min(self.img_size)} for "
                    f"{list(self.img_size)} images (reflect padding takes at most image size - 1 pixels)"
                )
            self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], transform)
            self.val_set = TensorImageDataset(images[val_idx], labels[val_idx])
            mix = build_batch_mix(self.num_classes, **self.mix)
            self.pipeline = BatchPipeline(
                self.mean, self.std, self.augment, self.img_size_schedule, mix, self.crop_padding_schedule
            )
            log.info(
                "data: %s at %s, %d classes, %d train / %d val images of %s",
                self.name,
                self.root,
                self.num_classes,
                len(self.train_set),
                len(self.val_set),
                "x".join(map(str, self.img_size)),
            )
        if stage in ("test", None) and self.test_set is None and self.has_test:
            images, labels, _ = self._load(train=False)
            self.test_set = TensorImageDataset(images, labels)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        # A training sampler of our own only for the alternating flip; otherwise DataLoader's shuffle.
        sampler = AlternatingFlipSampler(len(ds), self.seed) if train and self.augment.alternate_flip else None
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(ds) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataError(f"{self.root} has no test split (expected {self.root}/test/<class>/...)")
        return self._loader(self.test_set, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            clock = RunClock.of(self.trainer)
            return self.pipeline.train(images, labels, clock.fraction if clock is not None else None)
        return self.pipeline.normalize(images), labels

    # -- what checkpoints record (Lightning stores this under the class name) -----------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "img_size": list(self.img_size),
            # Where the data came from and how val was carved, so vit-eval can rebuild the same split.
            "source": {
                "name": self.name,
                "root": os.path.abspath(self.root),
                "val_size": self.val_size,
                "seed": self.seed,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On resume or test from a checkpoint: the data must have the classes it was trained on."""
        if state.get("class_names") not in (None, self.class_names):
            raise DataError(
                f"the checkpoint was trained on classes {state['class_names']}, but {self.root} has {self.class_names}"
            )
