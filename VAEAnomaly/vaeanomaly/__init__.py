"""VAEAnomaly core library: unsupervised anomaly localisation in brain MRI with VAE / β-VAE.

Pure Python (torch, numpy, SimpleITK, scikit-learn); never imports Slicer.
"""
__version__ = "0.1.0"
