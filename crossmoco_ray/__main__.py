from crossmoco_ray.cli.main import main

raise SystemExit(main())
