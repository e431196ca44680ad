"""Evaluation: frozen features, linear SVM, few-shot, model import/export, plots, the training monitor."""
