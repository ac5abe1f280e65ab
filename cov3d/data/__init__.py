"""Scans in, tensors out: finding scans, reading every format, resampling, the cache, datasets, synthetic phantoms."""
