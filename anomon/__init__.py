"""anomon: anomaly-detection monitoring for visual inspection lines."""

__version__ = "0.1.0"
