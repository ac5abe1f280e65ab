"""Scans in, tensors out: finding scans, reading every format, resampling, the cache, datasets, synthetic phantoms."""

# cov3d 0.3's `cov3d.data` module is this package's `dataset` module now; its names still import from here,
# loaded on first use so that reading a scan does not import the datasets.
_DATASET = ("ScanDataset", "Splits", "load_splits", "reflect", "random_crop")


def __getattr__(name: str):
    if name in _DATASET:
        from cov3d.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'cov3d.data' has no attribute {name!r}")
