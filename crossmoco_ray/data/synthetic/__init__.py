"""The built-in synthetic dataset: procedural everyday objects, so pretraining needs no download."""
