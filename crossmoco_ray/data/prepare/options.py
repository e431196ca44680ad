"""``prepare``'s options (:class:`PrepareOptions`) and the fingerprint of what they and a source produce.

The fingerprint is what makes re-running the same ``crossmoco prepare`` a no-op: the manifest records it,
and a dataset whose fingerprint matches (and whose shards pass a quick check) is not prepared again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from crossmoco_ray.data.prepare.sample_checks import MIN_POINTS
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.shards.manifest import SCHEMA_VERSION
from crossmoco_ray.data.shards.meshes import MAX_MESH_FACES
from crossmoco_ray.data.sources.base import Source


@dataclass
class PrepareOptions:
    """How ``prepare`` turns samples into shards."""

    num_points: int | None = None  # resample every cloud to this many points; None: keep (all must agree)
    min_points: int = MIN_POINTS
    val_fraction: float = 0.0  # carve a validation split from train (by a hash of seed and id)
    seed: int = 0
    render: RenderSpec = field(default_factory=RenderSpec)
    rows_per_shard: int = 2048
    row_group_rows: int = 256
    skip_bad: bool = False
    overwrite: bool = False
    preview: str | None = None  # path of a contact sheet PNG
    preview_objects: int = 8
    shuffle: bool = True  # rows in a seeded random order per split (False: the source's order)
    bucket_rows: int = 1024  # objects per temporary bucket of the shuffle (what pass 2 holds in memory)
    max_buckets: int = 256  # open bucket files in pass 1, at most
    ray: bool = False  # read, check and render on Ray Data across the cluster (:mod:`.on_ray`)
    ray_cpus: int | None = None  # CPUs of the local Ray started for it (None: all); ignored on a cluster
    # What the image modality is stored as: "renders" (PNG views, rendered here where the source has none),
    # "meshes" (the triangle mesh, decimated to mesh_faces, no renders: training renders fresh viewpoints;
    # point-only objects keep only their points, whose splats training renders) or "both".
    store: Literal["renders", "meshes", "both"] = "renders"
    mesh_faces: int = 20_000  # stored meshes with more faces are decimated to this many

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction}: must be in [0, 1)")
        for name in ("rows_per_shard", "row_group_rows", "bucket_rows", "max_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: must be at least 1")
        if self.num_points is not None and self.num_points < 1:
            raise ValueError(f"num_points {self.num_points}: must be at least 1")
        if self.store not in ("renders", "meshes", "both"):
            raise ValueError(f"store {self.store!r}: must be 'renders', 'meshes' or 'both'")
        if not 4 <= self.mesh_faces <= MAX_MESH_FACES:
            raise ValueError(f"mesh_faces {self.mesh_faces}: must be at least 4 and at most {MAX_MESH_FACES}")

    @property
    def renders(self) -> bool:
        """Whether views are rendered here for sources without images."""
        return self.store != "meshes"

    @property
    def meshes(self) -> bool:
        """Whether meshes are stored."""
        return self.store != "renders"

    def identity(self, meshes: bool = False) -> dict[str, Any]:
        """What identifies these options' output (``meshes``: the source's views are mesh renders)."""
        keep = (
            "num_points",
            "min_points",
            "val_fraction",
            "seed",
            "rows_per_shard",
            "row_group_rows",
            "shuffle",
            "bucket_rows",
            "max_buckets",
        )
        render = asdict(self.render)
        meshes = meshes and not self.render.points_only
        if not self.render.points_only:
            render.pop("points_only")  # the fingerprints of datasets prepared before the option hold
        if self.render.zoom == 1.0:
            render.pop("zoom")  # likewise
        if self.render.mode != "shaded" and not meshes:
            # Lighting only shapes shaded views (and every mesh render): leaving it out keeps the fingerprints
            # of datasets prepared before it existed, so re-running their prepare command stays a no-op.
            for key in ("light", "ambient", "supersample", "normal_neighbours"):
                render.pop(key)
        stored = {"store": self.store, "mesh_faces": self.mesh_faces} if self.meshes else {}
        return {**{k: getattr(self, k) for k in keep}, "render": render, **stored}


def fingerprint(source: Source, opts: PrepareOptions) -> str:
    """What identifies the dataset ``source`` and ``opts`` produce (the manifest's ``fingerprint``)."""
    blob = json.dumps(
        {
            "schema": SCHEMA_VERSION,
            "source": source.identity(),
            "options": opts.identity(meshes=source.has_meshes()),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
