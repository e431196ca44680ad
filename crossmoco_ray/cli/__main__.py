"""``python -m crossmoco_ray.cli`` (what ``cluster/submit.sh`` runs on a cluster), as ``crossmoco``."""

from crossmoco_ray.cli.main import main

raise SystemExit(main())
