"""Metrics and evaluation harnesses for the loops."""
