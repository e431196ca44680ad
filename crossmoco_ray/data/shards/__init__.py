"""Prepared shards: the Parquet layout, the manifest and its seal, integrity checks when read, ``verify``."""
