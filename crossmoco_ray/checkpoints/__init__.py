"""Checkpoints: the format, names, the progress and history records, resume points, encoder export/import."""
