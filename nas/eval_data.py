"""The data of an evaluation: CIFAR-10 as tensors on the device, ImageNet through ImageFolder in loader
processes; with data-parallel ranks, each rank's part of every global batch and of the test set
(nas/distributed.py, docs/science.md §4.3)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from .data import (
    CIFAR_TRAIN_SIZE,
    batches,
    crop_flip_draws,
    cutout,
    cutout_draws,
    downsample,
    imagenet_folder,
    load_cifar10,
    normalize,
    random_crop_flip,
    stream_generator,
    synthetic_cifar,
)
from .distributed import Group
from .eval_config import IMAGENET_MEAN, IMAGENET_STD, EvalConfig


class _CifarData:
    """CIFAR-10 as tensors on the device; crop, flip and cutout on whole batches. Every rank draws the
    permutation and the augmentation of the whole global batch and takes its part (nas/distributed.py)."""

    def __init__(self, config: EvalConfig, device: torch.device, group: Group):
        if config.data.synthetic:
            train, test = synthetic_cifar(
                config.data.subset or CIFAR_TRAIN_SIZE, config.data.test_subset or 10_000, config.seed
            )
        else:
            train, test = load_cifar10(config.data.root, config.data.download)
        g = torch.Generator().manual_seed(config.seed)
        if config.data.subset:
            train = train.take(torch.randperm(len(train), generator=g)[: config.data.subset])
        if config.data.test_subset:
            test = test.take(torch.randperm(len(test), generator=g)[: config.data.test_subset])
        self.train = downsample(train, config.image_size).to(device)
        self.test = downsample(test.take(torch.arange(len(test))[group.part(len(test))]), config.image_size).to(device)
        self.config, self.group = config, group

    def train_batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, int]]:
        """(this rank's images, their labels, the global batch's size) per step."""
        g = stream_generator(self.config.seed, epoch, 0)
        order = torch.randperm(len(self.train), generator=g).to(self.train.images.device)
        size = self.config.image_size
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            part = self.group.part(len(index))
            offsets, flips = crop_flip_draws(len(index), g, size // 8)
            images = random_crop_flip(self.train.images[index[part]], None, size // 8, (offsets[:, part], flips[part]))
            images = normalize(images, torch.get_default_dtype())
            if self.config.cutout:
                rows, cols = cutout_draws(len(index), g, size, size)
                images = cutout(images, None, self.config.cutout, (rows[part], cols[part]))
            yield images, self.train.labels[index[part]], len(index)

    def test_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of the test set."""
        return batches(self.test, 256, torch.Generator(), augment=False, shuffle=False, dtype=torch.get_default_dtype())

    def train_steps(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)


class _GlobalBatches(torch.utils.data.Sampler):
    """Batches of indices: the global permutation of an epoch cut into global batches, this rank's part
    of each (all of it with one rank)."""

    def __init__(self, count: int, batch_size: int, group: Group, generator: torch.Generator | None):
        self.count, self.batch_size, self.group, self.generator = count, batch_size, group, generator

    def __iter__(self):
        order = torch.randperm(self.count, generator=self.generator) if self.generator else torch.arange(self.count)
        for start in range(0, self.count, self.batch_size):
            index = order[start : start + self.batch_size]
            yield index[self.group.part(len(index))].tolist()

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)


class _ImageNetData:
    """ImageNet through ImageFolder, with the DARTS augmentation, in loader processes (`data.workers`
    per rank), each rank loading its part of every global batch and of the validation set."""

    def __init__(self, config: EvalConfig, device: torch.device, group: Group):
        import torchvision.transforms as T

        root = config.data.root or os.environ.get("NAS_IMAGENET_ROOT") or "data/imagenet"
        size = config.image_size
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose([
            T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2), T.ToTensor(), norm,
        ])  # fmt: skip
        test_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
        self.train = imagenet_folder(root, "train", train_tf)
        self.test = imagenet_folder(root, "val", test_tf)
        g = torch.Generator().manual_seed(config.seed)
        if config.data.subset:
            self.train = torch.utils.data.Subset(
                self.train, torch.randperm(len(self.train), generator=g)[: config.data.subset].tolist()
            )
        if config.data.test_subset:
            self.test = torch.utils.data.Subset(
                self.test, torch.randperm(len(self.test), generator=g)[: config.data.test_subset].tolist()
            )
        self.test = torch.utils.data.Subset(self.test, list(range(len(self.test)))[group.part(len(self.test))])
        self.config, self.device, self.group = config, device, group

    def _loader(self, dataset, sampler):
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=self.config.data.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip

    def train_batches(self, epoch: int):
        g = stream_generator(self.config.seed, epoch, 0)
        sampler = _GlobalBatches(len(self.train), self.config.batch_size, self.group, g)
        for step, (images, labels) in enumerate(self._loader(self.train, sampler)):
            count = min(self.config.batch_size, len(self.train) - step * self.config.batch_size)
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), count

    def test_batches(self):
        sampler = _GlobalBatches(len(self.test), self.config.batch_size, Group(), None)
        for images, labels in self._loader(self.test, sampler):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def train_steps(self) -> int:
        return math.ceil(len(self.train) / self.config.batch_size)


def make_eval_data(config: EvalConfig, device: torch.device, group: Group | None = None):
    group = group or Group.current()
    return (_ImageNetData if config.dataset == "imagenet" else _CifarData)(config, device, group)
