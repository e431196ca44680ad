"""The data layer: readers, renderer, synthetic set, shards, augmentations; Ray only in ``pipeline``."""
