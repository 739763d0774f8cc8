"""lrsweep's version: stored in every study and result file, checked when a worker joins."""

__version__ = "0.1.0"
