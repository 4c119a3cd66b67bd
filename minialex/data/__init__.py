"""Data: list files, image decoding, transforms, the batch loader, demo data and dataset preparation.

Flow: read_list / read_dataset -> Samples; DataLoader decodes (load_image) and transforms
(TrainTransform / EvalTransform) them into float32 batches in background threads.
"""
from minialex.data.demo import DemoData, demo_dataset
from minialex.data.images import MAX_PIXELS, load_image
from minialex.data.listfile import Sample, default_class_names, read_dataset, read_labels, read_list
from minialex.data.loader import DataLoader
from minialex.data.prepare import FASHION_MNIST_CLASSES, prepare_fashion_mnist, prepare_folder
from minialex.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, Stats, TrainTransform,
                                      compute_mean_std, compute_stats)

__all__ = ["DataLoader", "DemoData", "EvalTransform", "FASHION_MNIST_CLASSES", "IMAGENET_MEAN",
           "IMAGENET_STD", "MAX_PIXELS", "Sample", "Stats", "TrainTransform", "compute_mean_std", "compute_stats",
           "default_class_names", "demo_dataset", "load_image", "prepare_fashion_mnist",
           "prepare_folder", "read_dataset", "read_labels", "read_list"]
