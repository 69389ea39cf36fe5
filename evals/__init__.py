"""Spec-Bench-style evaluation."""
