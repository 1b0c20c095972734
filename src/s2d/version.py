"""The version of s2d, recorded in every run folder."""

__version__ = "0.1.0"
