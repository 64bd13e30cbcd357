"""Zero-shot anomaly-detection methods under one protocol (base.py); registry.py names them."""
