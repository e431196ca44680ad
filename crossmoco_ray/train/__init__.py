"""Training: the optimisation step (pure torch), and — in later modules — the Ray worker loop and launcher.

Importing this package does not import Ray: ``train.step`` runs on a bare GPU box.
"""
