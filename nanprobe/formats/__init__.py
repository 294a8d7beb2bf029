"""Formats: a Report rendered as a terminal table, GitHub annotations, JUnit XML or a plot."""
