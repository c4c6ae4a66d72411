"""Analyses that look inside a merge rather than search over it.

Each module measures something about the models a study merges (today: Hi-Merging's layer-wise
contribution probes in :mod:`optimizer.analysis.contributions`) and returns a typed, JSON-ready
record that the study can cache, the CLI can print, and the search can turn into warm starts and
a narrower space.
"""
