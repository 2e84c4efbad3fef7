"""Evaluation: reward metrics, win rates, harm rate, reports."""
