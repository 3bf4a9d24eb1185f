"""Scoring: ``evaluate()`` against reference labels, the metrics, and attention knock-out."""
