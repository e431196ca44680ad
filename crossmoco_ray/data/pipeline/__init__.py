"""The training input pipeline on Ray Data: shards → class-mixed batches of two point views and two images."""
