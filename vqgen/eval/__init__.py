"""Evaluation: metrics, feature spaces (Inception or a dataset classifier), the report and ``evaluate.py``."""
