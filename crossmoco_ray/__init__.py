"""crossmoco-ray: CrossMoCo pretraining of point-cloud encoders on Ray."""

__version__ = "0.1.0"
