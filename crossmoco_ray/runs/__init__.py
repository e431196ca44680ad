"""The spine of every Ray Train run: a run's identity and resources, the launcher, the worker skeleton."""
