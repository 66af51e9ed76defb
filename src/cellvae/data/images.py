"""Single-cell images as arrays and tensors: checked conversion of (n, H, W, C) uint8 or [0, 1] float arrays
(:func:`to_float_images`), channels-last <-> channels-first, and :class:`ImageData`, the minibatch interface of the
training loop for images (:class:`cellvae.ImageVAE`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..errors import CellvaeInputError
from .tensors import CellData, minibatch_slices

__all__ = ['to_float_images', 'channels_first', 'channels_last', 'ImageData']


# ------------------------------------------------------------------------------------------------ inputs
def to_float_images(images, n_channels: int | None = None, image_size: tuple[int, int] | None = None,
                    what: str = "images") -> np.ndarray:
    """Check an image stack and return it as float32 in [0, 1], channels last.

    Args:
        images: (n, H, W, C) array: ``uint8`` (divided by 255) or float (must lie in [0, 1]); a torch tensor is
            accepted too.
        n_channels, image_size: when given (a trained model's), C and (H, W) must match them.
        what: the argument's name, for the messages.

    Returns:
        (n, H, W, C) float32 array with values in [0, 1].

    Raises:
        CellvaeInputError: not an array, ndim other than 4, an image shape or channel count other than the model's
            (with a hint when the array looks channels-first), an integer dtype other than uint8, a bool or
            non-numeric dtype, NaN or infinite values, or float values outside [0, 1].
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    try:
        arr = np.asarray(images)
    except Exception as e:  # noqa: BLE001 - ragged lists and the like
        raise CellvaeInputError(f"{what} cannot be read as an array ({type(e).__name__}: {e}).") from e
    if arr.dtype == object or arr.dtype.kind not in "uif":
        raise CellvaeInputError(f"{what} must be a numeric array (uint8 or float in [0, 1]), got dtype {arr.dtype}.")
    if arr.ndim != 4:
        hint = " For a single image use images[None]." if arr.ndim == 3 else ""
        raise CellvaeInputError(f"{what} must have 4 dimensions (n_images, height, width, channels), got shape "
                                f"{arr.shape}.{hint}")
    n, h, w, c = arr.shape
    if n_channels is not None and image_size is not None:
        want = (int(image_size[0]), int(image_size[1]), int(n_channels))
        if (h, w, c) != want:
            hint = ""
            if arr.shape[1] == n_channels and tuple(arr.shape[2:]) == want[:2]:
                hint = " The array looks channels-first (n, C, H, W): pass images.transpose(0, 2, 3, 1)."
            raise CellvaeInputError(
                f"{what} have shape (H, W, C) = {(h, w, c)}, but the model was built for {want} (n_images, "
                f"{want[0]}, {want[1]}, {want[2]}).{hint}")
    if arr.dtype.kind in "iu":
        if arr.dtype != np.uint8:
            raise CellvaeInputError(
                f"{what} have integer dtype {arr.dtype}; pass uint8 (0-255, divided by 255) or float in [0, 1] "
                "(e.g. images / images.max() for 16-bit data, with one scale for all images).")
        return arr.astype(np.float32) / np.float32(255.0)
    out = np.asarray(arr, dtype=np.float32)
    if out.size:
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise CellvaeInputError(f"{what} contain {bad} NaN or infinite values; remove or fill them first.")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise CellvaeInputError(
                f"float {what} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. Pass uint8 images (0-255), "
                "or rescale with one scale for all images (e.g. images / 255).")
    return out


def channels_first(x: np.ndarray) -> torch.Tensor:
    """(n, H, W, C) float32 numpy -> (n, C, H, W) contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def channels_last(x: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) tensor -> (n, H, W, C) float32 numpy."""
    return np.ascontiguousarray(x.detach().cpu().numpy().transpose(0, 2, 3, 1)).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------- data
class ImageData(CellData):
    """Image tensors with the minibatch interface of :class:`cellvae.data.CellData` that
    :func:`cellvae.train.train_module` reads (an "image" for each "cell"; no gene totals).

    Args:
        images: (n, C, H, W) float32 tensor with values in [0, 1] (channels first).

    Attributes:
        X: the images, (n, C, H, W) float32.
        cat: (n, 1) int64 zeros (one "batch"; the image model has no covariates).
        cont: None.
        n_cells: n.
    """

    def __init__(self, images: torch.Tensor):
        if images.dim() != 4:
            raise CellvaeInputError(f"ImageData needs an (n, C, H, W) tensor, got shape {tuple(images.shape)}.")
        self.X = images.float().contiguous()
        self.n_cells = int(images.shape[0])
        self.cat = torch.zeros(self.n_cells, 1, dtype=torch.int64)
        self.cont = None
        self.csr = None
        # what a training failure suggests (cellvae.train; the default text is about count data)
        self.failure_hint = ("images with non-finite or extreme pixel values (scale them to [0, 1]; "
                             "cellvae.data.images.to_float_images)")

    def batch(self, idx: torch.Tensor):
        """Images ``idx`` (int64 tensor) as ``(x, cat, cont)``: (len(idx), C, H, W), (len(idx), 1), None."""
        return self.X.index_select(0, idx), self.cat.index_select(0, idx), None

    def iterate(self, indices: torch.Tensor, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple]:
        """Yield ``(x, cat, cont)`` minibatches over ``indices`` (see :func:`cellvae.data.minibatch_slices`)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if shuffle:
            indices = indices[torch.randperm(len(indices), generator=generator)]
        for a, b in minibatch_slices(len(indices), batch_size):
            yield self.batch(indices[a:b])


