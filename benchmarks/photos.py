"""Photo crops from scikit-image's bundled photos: the real-image inputs of the model zoos.

Torch-free, so that exporters in other environments (`keras_models.py`, which runs where
TensorFlow is installed) read the same crops as `zoo_models.py`: random area/aspect crops,
flipped half the time, resized and normalised with the ImageNet mean and std. Calibration and
held-out crops come from disjoint photos.
"""

from __future__ import annotations

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")
HELDOUT_PHOTOS = ("chelsea", "hubble_deep_field", "retina", "camera")


def photo_crops(photos: tuple[str, ...], count: int, size: int, seed: int) -> np.ndarray:
    """`count` random crops (8–100 % of the area, aspect 3/4–4/3, random flip) of the photos.

    The photos are used in turn; each crop is resized to size×size with anti-aliasing and
    normalised with the ImageNet mean/std. Returns NCHW float32.
    """
    import skimage.data
    from skimage.color import gray2rgb
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    images = [getattr(skimage.data, p)() for p in photos]
    images = [gray2rgb(im) if im.ndim == 2 else im[..., :3] for im in images]
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        crop = random_crop(image, rng)
        crop = resize(crop, (size, size), anti_aliasing=True).astype(np.float32)
        crops.append(((crop - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(crops).astype(np.float32)


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random area/aspect crop as in torchvision's RandomResizedCrop, flipped half the time."""
    h, w = image.shape[:2]
    area = rng.uniform(0.08, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = image[top : top + ch, left : left + cw]
    return crop[:, ::-1] if rng.random() < 0.5 else crop
