"""epmq: expert-guided post-merge quantization (E-PMQ, arXiv 2605.16882) in PyTorch Lightning."""

__version__ = "0.1.0"
