"""Rendering: the cameras, point splatting and mesh rasterising that make the image modality."""
