"""Small datasets written in the real on-disk formats (h5py, PLY, PNG via Pillow, npy, xyz)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from crossmoco_ray.data.render.splat import encode_png
from crossmoco_ray.data.sources.ply import write_ply


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


def cube_mesh(
    half: float = 1.0, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """An axis-aligned cube as 8 vertices and 6 quads ``[6, 4]`` (mesh files store polygons)."""
    v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64) * half
    quads = np.array([(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)])
    return v + np.asarray(centre), quads


def write_off(path: Path, vertices: np.ndarray, faces: np.ndarray, malformed: bool = False) -> Path:
    """An OFF file; ``malformed``: ModelNet's broken header, the counts glued to ``OFF`` on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = f"{len(vertices)} {len(faces)} 0"
    head = f"OFF{counts}\n" if malformed else f"OFF\n{counts}\n"
    rows = [" ".join(f"{c:.6f}" for c in v) for v in vertices]
    rows += [" ".join(str(i) for i in (len(f), *f)) for f in faces]
    path.write_text(head + "\n".join(rows) + "\n")
    return path


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    """A Wavefront OBJ (1-based indices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["# test mesh"] + [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    rows += ["f " + " ".join(str(i + 1) for i in f) for f in faces]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_ply_mesh(path: Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    """An ascii PLY with a vertex and a face element."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = [
        "ply",
        "format ascii 1.0",
        f"element vertex {len(vertices)}",
        "property float x",
        "property float y",
        "property float z",
        f"element face {len(faces)}",
        "property list uchar int vertex_indices",
        "end_header",
    ]
    rows = [" ".join(f"{c:.6f}" for c in v) for v in vertices]
    rows += [" ".join(str(i) for i in (len(f), *f)) for f in faces]
    path.write_text("\n".join(head + rows) + "\n")
    return path


def non_manifold_mesh() -> tuple[np.ndarray, np.ndarray]:
    """Three fins sharing one edge (non-manifold) plus a triangle touching them at a single vertex."""
    v = np.array(
        [[0, 0, 0], [0, 1, 0], [1, 0.5, 0], [-1, 0.5, 0.2], [0, 0.5, 1], [0.3, 1.8, 0.3], [-0.4, 1.6, -0.5]],
        dtype=np.float64,
    )
    f = np.array([(0, 1, 2), (0, 1, 3), (0, 1, 4), (1, 5, 6)])
    return v, f


def mesh_folder(root: Path) -> Path:
    """ModelNet's layout ``<root>/<class>/<split>/`` with OFF (some with the malformed header), OBJ and PLY
    meshes, a non-manifold one, in raw units (tens of centimetres, off-centre)."""
    for i in range(3):
        v, q = cube_mesh(half=20.0 + i, centre=(100.0, 5.0 * i, -30.0))
        write_off(root / "cube" / "train" / f"cube_{i:04d}.off", v, q, malformed=i % 2 == 0)
    write_off(root / "cube" / "test" / "cube_0100.off", *cube_mesh(half=3.0), malformed=True)
    v, q = cube_mesh()
    slab = v * np.array([2.0, 0.2, 1.0])
    write_obj(root / "slab" / "train" / "slab_0001.obj", slab, q)
    write_ply_mesh(
        root / "slab" / "train" / "slab_0002.ply", slab * 3, np.concatenate([q[:, :3], q[:, [0, 2, 3]]])
    )
    write_obj(root / "slab" / "test" / "slab_0100.obj", slab * 0.5, q)
    write_ply_mesh(root / "fins" / "train" / "fins_0001.ply", *non_manifold_mesh())
    write_off(root / "fins" / "test" / "fins_0100.off", *non_manifold_mesh())
    return root
