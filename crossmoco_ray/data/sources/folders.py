"""File-per-object sources: CrossPoint's ShapeNetRender layout and plain class folders.

- ``shapenetrender``: ``ShapeNet/<synset>/<id>.ply`` with ``ShapeNetRendering/<synset>/<id>/rendering/*.png``
  (the views come with the data; nothing is rendered at prepare time).
- ``folder``: one object per file, the class is a folder: ``<root>/[<split>/]<class>/<name>.<ext>`` or
  ModelNet's own layout ``<root>/<class>/<split>/<name>.<ext>`` (as ModelNet40/10 ship). Files are point
  clouds (``.npy``, ``.xyz``, ``.txt``, ``.ply`` without faces) or triangle meshes (``.off``, ``.obj``,
  ``.stl``, ``.glb``, ``.gltf``, ``.ply`` with faces; :mod:`.mesh`), which may be mixed. A mesh gives the
  sample its points (sampled on the surface, area-weighted, seeded per object) and is kept on the sample,
  so its views are shaded renders of the mesh rather than of the points.

Files are read one at a time; an unreadable one is yielded as a :class:`DataError` naming it. Only regular
files are read (a FIFO named ``x.ply`` would block the reader forever, ``/dev/zero`` behind a link would never
end); what a file claims is checked before memory is spent on it (a ``.npy`` header's shape against the
file's size); a file or class folder whose name is not UTF-8 (Linux names are bytes) is named as bad, since
ids and class names are stored as text.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.render.splat import check_view_size
from crossmoco_ray.data.sources.base import Source, UpAxis, decodable, file_identity, regular_file, to_y_up
from crossmoco_ray.data.sources.mesh import MESH_SUFFIXES, is_mesh_file, read_mesh, surface_points
from crossmoco_ray.data.sources.ply import ply_points, read_ply
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError

POINT_SUFFIXES = (".ply", ".npy", ".xyz", ".txt")
SUFFIXES = POINT_SUFFIXES + MESH_SUFFIXES
SPLITS = ("train", "test", "val")
TEXT_BYTES = 256 * 1024**2  # .xyz/.txt files larger than this (≈10M points) are refused: parsing takes ~10×
TEXT_TOO_LARGE = f"text point file over {TEXT_BYTES // 1024**2} MiB: save it as .npy or .ply"
VIEW_BYTES = 32 * 1024**2  # a rendered view larger than this is not a view (ShapeNetRendering's are ~10 KB)
CORPUS_HINT = (
    f" ({' '.join(SUFFIXES)}); a folder tree of object files without classes is prepared with --format corpus"
)
NOT_UTF8 = "its name is not valid UTF-8 (ids and class names are stored as text): rename it"


def _listing(folder: Path) -> list[Path]:
    """The entries of ``folder`` (none when it cannot be listed: it is named where it is needed)."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


class ShapeNetRenderSource(Source):
    """CrossPoint's layout: ``ShapeNet/<synset>/<id>.ply`` + ``ShapeNetRendering/.../rendering/*.png``."""

    format = "shapenetrender"

    def __init__(self, root: str | Path, up_axis: UpAxis = "y") -> None:
        self.root, self.up_axis = Path(root), up_axis
        self.cloud_dir, self.render_dir = self.root / "ShapeNet", self.root / "ShapeNetRendering"
        for d in (self.cloud_dir, self.render_dir):
            if not d.is_dir():
                raise DataError(
                    printable(d), "missing: a ShapeNetRender root holds ShapeNet/ and ShapeNetRendering/"
                )
        # A synset folder named in bytes that are not UTF-8 is no class: its clouds are named as bad.
        folders = [p for p in _listing(self.cloud_dir) if _is_dir(p)]
        self.synsets = [p.name for p in folders if decodable(Path(p.name))]
        self.clouds = [f for d in folders for f in _listing(d) if f.suffix == ".ply" and regular_file(f)]

    def splits(self) -> list[str]:
        return ["train"]

    def class_names(self) -> list[str] | None:
        return self.synsets

    def count(self, split: str) -> int | None:
        return len(self.clouds)

    def has_views(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return {"format": self.format, "up_axis": self.up_axis, "files": file_identity(self.clouds)}

    def tasks(self, split: str) -> list[Any]:
        return [str(p) for p in self.clouds]

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        ply = Path(task)
        if not decodable(ply, self.cloud_dir):
            yield DataError(printable(ply), NOT_UTF8)
            return
        try:
            yield self._sample(ply, self.synsets.index(ply.parent.name), split)
        except DataError as err:
            yield err

    def _sample(self, ply: Path, label: int, split: str) -> Sample:
        synset, model = ply.parent.name, ply.stem
        views_dir = self.render_dir / synset / model / "rendering"
        pngs = [f for f in _listing(views_dir) if f.suffix == ".png" and regular_file(f)]
        if not pngs:
            raise DataError(
                printable(ply), f"no rendered views: expected PNG files in {printable(views_dir)}"
            )
        views = []
        for png in pngs:
            try:
                if png.stat().st_size > VIEW_BYTES:
                    raise DataError(printable(png), f"over {VIEW_BYTES // 1024**2} MiB: not a rendered view")
                data = png.read_bytes()
            except OSError as err:
                raise DataError(printable(png), f"unreadable image: {printable(err)}") from err
            try:
                check_view_size(data)  # the header only: a view that claims too many pixels is not decoded
            except ValueError as err:
                raise DataError(printable(png), printable(err, 300)) from None
            views.append(data)
        points = to_y_up(read_ply(ply), self.up_axis)
        return Sample(f"{synset}/{model}", points, views, label, printable(ply), 0, split)


class FolderSource(Source):
    """One object per file, class = a folder: ``<root>/[<split>/]<class>/<name>.<ext>`` or ModelNet's
    ``<root>/<class>/<split>/<name>.<ext>``; points or meshes (:mod:`.mesh`).

    Args:
        root: the folder.
        up_axis: the data's up axis (points and meshes are turned to y-up).
        mesh_points: points sampled on each mesh's surface.
        seed: the sampling seed (each object draws from ``(seed, its id)``).
        fps: farthest-point sampling of the mesh points (from a 4× denser draw) instead of a plain draw.
    """

    format = "folder"

    def __init__(
        self,
        root: str | Path,
        up_axis: UpAxis = "y",
        mesh_points: int = 2048,
        seed: int = 0,
        fps: bool = False,
    ) -> None:
        self.root, self.up_axis = Path(root), up_axis
        self.mesh_points, self.seed, self.fps = mesh_points, seed, fps
        self._has_meshes: bool | None = None
        self._listing: dict[str, list[Path]] = {}
        if not _is_dir(self.root):
            raise DataError(printable(self.root), "not a directory")
        tops = [d for d in _listing(self.root) if _is_dir(d)]
        split_dirs = [d.name for d in tops if d.name in SPLITS]
        # ModelNet's layout: class folders at the top, each holding split folders.
        self.class_major = not split_dirs and any(_is_dir(d / s) for d in tops for s in SPLITS)
        self.split_dirs = False
        if self.class_major:
            folders = sorted({d.name for d in tops})
            names = {d.name for c in tops for d in _listing(c) if _is_dir(d) and d.name in SPLITS}
            self._splits = [s for s in SPLITS if s in names]
        else:
            self._splits = split_dirs or ["train"]
            self.split_dirs = bool(split_dirs)
            bases = [self.root / s for s in split_dirs] or [self.root]
            folders = sorted({c.name for base in bases for c in _listing(base) if _is_dir(c)})
        # A class folder named in bytes that are not UTF-8 is no class (its name could not be stored or
        # printed); its files are listed all the same, so that each is named as bad and counted.
        self.classes = [c for c in folders if decodable(Path(c))]
        self._undecodable = [c for c in folders if not decodable(Path(c))]
        if not folders:
            raise DataError(printable(self.root), f"no class folders with point or mesh files{CORPUS_HINT}")
        if not any(self._files(s) for s in self._splits):
            raise DataError(
                printable(self.root),
                f"its class folders ({printable(', '.join(folders[:3]), 80)}...) hold no point or mesh files "
                f"directly{CORPUS_HINT}",
            )

    def _class_dir(self, split: str, name: str) -> Path:
        if self.class_major:
            return self.root / name / split
        return self.root / split / name if self.split_dirs else self.root / name

    def _files(self, split: str) -> list[Path]:
        """The split's object files, listed once (count, identity, has_meshes and tasks all ask)."""
        if split not in self._listing:
            self._listing[split] = sorted(
                f
                for c in self.classes + self._undecodable
                for f in _listing(self._class_dir(split, c))
                if f.suffix.lower() in SUFFIXES and regular_file(f)
            )
        return self._listing[split]

    def splits(self) -> list[str]:
        return list(self._splits)

    def class_names(self) -> list[str] | None:
        return self.classes

    def count(self, split: str) -> int | None:
        return len(self._files(split))

    def identity(self) -> dict[str, Any]:
        files = [f for s in self._splits for f in self._files(s)]
        out: dict[str, Any] = {"format": self.format, "up_axis": self.up_axis, "files": file_identity(files)}
        if self.has_meshes():
            out["mesh_sampling"] = {"points": self.mesh_points, "seed": self.seed, "fps": self.fps}
        return out

    def has_meshes(self) -> bool:
        if self._has_meshes is None:  # reads PLY headers: once
            self._has_meshes = any(
                f.suffix.lower() in MESH_SUFFIXES or (f.suffix.lower() == ".ply" and _declares_faces(f))
                for s in self._splits
                for f in self._files(s)
            )
        return self._has_meshes

    def tasks(self, split: str) -> list[Any]:
        return [str(f) for f in self._files(split)]

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        yield self.read(split, Path(task))

    def read(self, split: str, f: Path) -> Sample | DataError:
        """The sample of one file (or the :class:`DataError` that names what is wrong with it)."""
        where = printable(f)
        if not decodable(f, self.root):
            return DataError(where, NOT_UTF8)
        label = self.classes.index(f.parent.parent.name if self.class_major else f.parent.name)
        sample_id = f"{self.classes[label]}/{f.stem}"
        try:
            if is_mesh_file(f):
                vertices, faces = read_mesh(f)
                vertices = to_y_up(vertices, self.up_axis)
                points = surface_points((vertices, faces), self.mesh_points, sample_id, self.seed, self.fps)
                return Sample(sample_id, points, None, label, where, 0, split, mesh=(vertices, faces))
            points = to_y_up(read_point_file(f), self.up_axis)
        except DataError as err:
            return err
        return Sample(sample_id, points, None, label, where, 0, split)


def _declares_faces(f: Path) -> bool:
    try:
        return is_mesh_file(f)
    except DataError:
        return False


def read_point_file(path: Path) -> np.ndarray:
    """``[N, 3]`` float32 from a .ply, .npy (first 3 columns) or .xyz/.txt (whitespace or commas) file.

    A ``.npy`` is mapped, not read whole (its header checked first); a text file is bounded by its size
    before it is read, then parsed as :func:`points_from_bytes` parses any point file's bytes.
    """
    suffix = path.suffix.lower()
    if suffix == ".ply":
        return read_ply(path)
    where = printable(path)
    try:
        if suffix == ".npy":
            return point_columns(_read_npy(path, where), where)
        if path.stat().st_size > TEXT_BYTES:
            raise DataError(where, TEXT_TOO_LARGE)
        data = path.read_bytes()
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(where, f"unreadable point file: {printable(err, 300)}") from None
    return points_from_bytes(data, suffix, where)


def points_from_bytes(data: bytes, suffix: str, where: str) -> np.ndarray:
    """``[N, 3]`` float32 of a point file's bytes (``.ply``, ``.npy`` first 3 columns, ``.xyz``/``.txt``;
    ``where`` names it in errors), with the checks and bounds of :func:`read_point_file`."""
    if suffix == ".ply":
        return ply_points(data, where)
    try:
        if suffix == ".npy":
            fp = io.BytesIO(data)
            shape, dtype = npy_header(fp, where)
            if not check_npy_claims(shape, dtype, len(data) - fp.tell(), where):
                return np.zeros((shape[0], 3), np.float32)
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            if len(data) > TEXT_BYTES:
                raise DataError(where, TEXT_TOO_LARGE)
            text = data.decode("latin-1").replace(",", " ")
            if not text.strip():
                raise DataError(where, "empty point file")
            arr = np.loadtxt(text.splitlines(), dtype=np.float32, ndmin=2)
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(where, f"unreadable point file: {printable(err, 300)}") from None
    return point_columns(arr, where)


def point_columns(arr: np.ndarray, where: str) -> np.ndarray:
    """The first three columns of a point file's ``[N, ≥3]`` array as contiguous float32."""
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise DataError(where, f"points must be [N, 3] (or more columns), got {tuple(arr.shape)}")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf: named by the checks
        return np.ascontiguousarray(arr[:, :3], dtype=np.float32)


def _read_npy(path: Path, where: str) -> np.ndarray:
    """A ``.npy`` array whose header was checked first: numbers, 2-D, and no more bytes than the file holds
    (a 100-byte file whose header claims 10¹⁰ rows must not make ``np.load`` allocate them)."""
    with open(path, "rb") as fp:
        shape, dtype = npy_header(fp, where)
        body = path.stat().st_size - fp.tell()
    if not check_npy_claims(shape, dtype, body, where):
        return np.zeros((shape[0], 3), np.float32)
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.array(arr[:, :3])  # a copy: nothing keeps the file mapped


def npy_header(fp: BinaryIO, where: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype a ``.npy`` header declares (``fp`` left after the header)."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        else:  # 2.0 and 3.0 share the layout (3.0 only allows UTF-8 in field names)
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    except OSError:
        raise
    except Exception as err:  # numpy parses the header as Python literals: SyntaxError, TokenError...
        raise DataError(
            where, f"unreadable .npy header: {printable(f'{type(err).__name__}: {err}', 300)}"
        ) from None
    return shape, dtype


def check_npy_claims(shape: tuple[int, ...], dtype: np.dtype[Any], body: int, where: str) -> bool:
    """A :class:`DataError` unless the header declares numbers ``[N, ≥3]`` that fit in the ``body`` bytes
    after it; False when the array is empty."""
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise DataError(where, f".npy holds {printable(dtype, 60)}, not numbers")
    if len(shape) != 2 or shape[1] < 3 or shape[0] < 0:
        raise DataError(where, f"points must be [N, 3] (or more columns), got {printable(shape, 60)}")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > body:
        raise DataError(
            where, f".npy header declares shape {shape} ({claimed} bytes) but the file holds {body} after it"
        )
    return claimed > 0
