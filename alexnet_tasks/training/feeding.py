"""The batch feeder: an in-memory split in a seeded order, the same for any run of the same (seed, epoch)."""

from __future__ import annotations

import math

import keras
import numpy as np


class ShuffledBatches(keras.utils.PyDataset):
    """Batches of an in-memory split, reshuffled each epoch from (seed, epoch).

    The order of epoch ``e`` depends only on the seed and ``e``, so a resumed
    run sees the same batches as an uninterrupted one; pass ``shuffle=False``
    to ``fit`` so Keras keeps that order. Batches are global batches of
    NumPy arrays: a distribution strategy splits each one over its replicas.
    """

    def __init__(self, images, labels, batch_size, seed, first_epoch=0, shuffle=True):
        super().__init__()
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch = first_epoch
        self._order = self._make_order()

    def _make_order(self):
        if not self.shuffle:
            return np.arange(len(self.labels))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.labels))

    def epoch_order(self) -> np.ndarray:
        """The image indices of the current epoch, batch after batch."""
        return self._order.copy()

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index):
        chosen = np.sort(self._order[index * self.batch_size : (index + 1) * self.batch_size])
        return self.images[chosen], self.labels[chosen]

    def on_epoch_end(self):
        self.epoch += 1
        self._order = self._make_order()
