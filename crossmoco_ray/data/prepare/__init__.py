"""``crossmoco prepare``: any source → validated shards (locally, or on Ray Data across a cluster)."""
