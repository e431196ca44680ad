"""Small datasets written in the real on-disk formats (h5py, PLY, PNG via Pillow, npy, xyz)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from crossmoco_ray.data.ply import write_ply
from crossmoco_ray.data.render import encode_png


def clouds(n: int, points: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, points, 3)).astype(np.float32)


def modelnet_h5(folder: Path, n_train: int = 12, n_test: int = 6, points: int = 64, classes: int = 3) -> Path:
    """``train.h5`` / ``test.h5`` (``data`` [n, P, 3], ``label`` [n, 1], ``name``) and shape_names.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        with h5py.File(folder / f"{split}.h5", "w") as f:
            f["data"] = clouds(n, points, seed)
            f["label"] = (np.arange(n) % classes).reshape(n, 1).astype(np.int64)
            f["name"] = np.array([f"{split}_{i:04d}".encode() for i in range(n)])
    (folder / "shape_names.txt").write_text("\n".join(f"class{c}" for c in range(classes)) + "\n")
    return folder


def scanobjectnn_h5(folder: Path, n: int = 10, points: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with h5py.File(folder / f"{split}.h5", "w") as f:
            f["data"] = clouds(n, points, 2)
            f["label"] = (np.arange(n) % 15).astype(np.int64)  # 1-D labels
    return folder


def png(value: int, size: int = 16) -> bytes:
    return encode_png(np.full((size, size, 3), value, dtype=np.uint8))


def shapenet_render(root: Path, objects: int = 4, views: int = 3, points: int = 64) -> Path:
    """CrossPoint's layout: ShapeNet/<synset>/<id>.ply and ShapeNetRendering/<synset>/<id>/rendering/*.png."""
    data = clouds(objects, points, 3)
    for i in range(objects):
        synset, model = ("02691156", "03001627")[i % 2], f"model{i:03d}"
        ply = root / "ShapeNet" / synset / f"{model}.ply"
        ply.parent.mkdir(parents=True, exist_ok=True)
        write_ply(ply, data[i], binary=i % 2 == 0)
        rendering = root / "ShapeNetRendering" / synset / model / "rendering"
        rendering.mkdir(parents=True, exist_ok=True)
        for v in range(views):
            (rendering / f"{v:02d}.png").write_bytes(png(40 * v + 10))
        (rendering / "rendering_metadata.txt").write_text("0 0 0 0 0\n")
    return root


def point_folder(root: Path, points: int = 64) -> Path:
    """<class>/<name>.{ply,npy,xyz,txt}."""
    data = clouds(5, points, 4)
    (root / "chair").mkdir(parents=True, exist_ok=True)
    (root / "table").mkdir(parents=True, exist_ok=True)
    write_ply(root / "chair" / "a.ply", data[0], binary=False)
    write_ply(root / "chair" / "b.ply", data[1], binary=True)
    np.save(root / "chair" / "c.npy", np.concatenate([data[2], np.ones((points, 3), np.float32)], axis=1))
    np.savetxt(root / "table" / "d.xyz", data[3])
    np.savetxt(root / "table" / "e.txt", data[4], delimiter=",")
    return root
