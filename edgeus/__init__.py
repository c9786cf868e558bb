"""edgeus: compress ultrasound image classifiers into small, fast INT8 engines."""
__version__ = "0.1.0"
