"""pdp: a geo-admission policy decision point for meeting platforms."""

__version__ = "0.1.0"
