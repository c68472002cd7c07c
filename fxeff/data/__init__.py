"""Real data that installs without a download: the photos bundled with scikit-image (``photos``) and
Fashion-MNIST from Debian's package, plain and cluttered (``fashion``)."""
from .fashion import (BACKGROUND, CLASSES, MEAN, STD, ClutteredFashionMNIST, FashionMNIST, data_dir, fashion_mnist_arrays,
                      normalize_fashion, random_shift_flip)
from .photos import PHOTOS, center_crop, normalize, photos, to_batch

__all__ = ["PHOTOS", "photos", "center_crop", "normalize", "to_batch", "BACKGROUND", "CLASSES", "MEAN", "STD", "data_dir",
           "fashion_mnist_arrays", "normalize_fashion", "FashionMNIST", "ClutteredFashionMNIST", "random_shift_flip"]
