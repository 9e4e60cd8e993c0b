"""CIFAR-10, CIFAR-100 and Fashion-MNIST, read from their official files into NumPy arrays.

Every loader returns images as uint8 NHWC and labels as int64; normalization to float happens
on the device, in the backends, mirroring `normalize` below. Nothing here imports a deep
learning framework, so the PyTorch and JAX trainers see the very same arrays.

Where the files go (`data_dir` defaults to $VITSPEC_DATA_DIR, else ./data):

    cifar10        data_dir/cifar-10-python.tar.gz   or the extracted data_dir/cifar-10-batches-py/
    cifar100       data_dir/cifar-100-python.tar.gz  or the extracted data_dir/cifar-100-python/
    fashion_mnist  data_dir/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
                   or /usr/share/datasets/fashion-mnist/ (Debian: apt-get install dataset-fashion-mnist)

`download(name, data_dir)` fetches the official archives and checks their MD5s;
`vitspec download NAME [--data-dir DIR]` does the same from a shell.

    records.py        ImageSet, OfficialSplits, Dataset, ChannelStats and STATS, the named errors
    download.py       the official files (RESOURCES), the verified download
    cifar.py          the CIFAR readers
    fashion_mnist.py  the IDX reader and Fashion-MNIST
    load.py           `load(name, ...)`: official splits, the validation split, normalize
"""

from vitspec.app.datasets import cifar, fashion_mnist
from vitspec.app.datasets.cifar import read_cifar10, read_cifar100
from vitspec.app.datasets.download import RESOURCES, Resource, default_data_dir, download, md5_of
from vitspec.app.datasets.fashion_mnist import read_fashion_mnist, read_idx
from vitspec.app.datasets.load import channel_stats, load, normalize, read_official, split_indices
from vitspec.app.datasets.records import (
    DATASET_NAMES,
    DEBIAN_FASHION_MNIST_DIR,
    DEFAULT_VALIDATION_SIZE,
    FASHION_MNIST_APT_COMMAND,
    FASHION_MNIST_CLASSES,
    LABEL_SETS,
    STATS,
    ChannelStats,
    ChecksumError,
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    DownloadError,
    ImageSet,
    OfficialSplits,
)

__all__ = [
    "DATASET_NAMES",
    "DEBIAN_FASHION_MNIST_DIR",
    "DEFAULT_VALIDATION_SIZE",
    "FASHION_MNIST_APT_COMMAND",
    "FASHION_MNIST_CLASSES",
    "LABEL_SETS",
    "RESOURCES",
    "STATS",
    "ChannelStats",
    "ChecksumError",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "DownloadError",
    "ImageSet",
    "OfficialSplits",
    "Resource",
    "channel_stats",
    "cifar",
    "default_data_dir",
    "download",
    "fashion_mnist",
    "load",
    "md5_of",
    "normalize",
    "read_cifar10",
    "read_cifar100",
    "read_fashion_mnist",
    "read_idx",
    "read_official",
    "split_indices",
]
