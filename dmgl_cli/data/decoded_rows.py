"""What the stores that decode when read share: a modality stored compactly (JPEG frames, 16-bit samples) and read
like the plain [n, ...] array the loader and a model expect (``len``, ``shape``, ``dtype``, numpy-style indexing of
whole samples, ``np.asarray``). A subclass says how rows are decoded (:meth:`DecodedRows.read_rows`)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class DecodedRows(ABC):
    shape: tuple[int, ...]  # the decoded array's: [n, ...]
    dtype: np.dtype

    @abstractmethod
    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Samples ``rows``, decoded: [len(rows), *shape[1:]] in ``dtype``."""

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        """Whole samples, decoded: ``store[i]``, ``store[rows]``, ``store[a:b]``, ``store[i, t]`` ..."""
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        rows = np.arange(len(self))[key]  # numpy's own rules and bounds checks for ints, slices and index arrays
        single = np.ndim(rows) == 0
        out = self.read_rows(np.atleast_1d(rows))
        if single:
            return out[0][rest] if rest else out[0]
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)
