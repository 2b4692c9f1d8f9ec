"""monossl: self-supervised learning from a single image (Asano et al., ICLR 2020)."""

__version__ = "0.1.0"
