"""Objectives: task data, metrics and golden data that score a merged candidate."""
