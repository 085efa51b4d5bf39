"""byzsgd: Byzantine-resilient distributed SGD with several parameter servers and workers."""
__version__ = "0.1.0"
