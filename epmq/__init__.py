"""epmq: expert-guided post-merge quantization (E-PMQ, arXiv 2605.16882) in PyTorch Lightning."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${epmq.either:a,b}` is a unless a is null, else b: the run folder is the resumed run's, or a new one.
OmegaConf.register_new_resolver("epmq.either", lambda a, b: b if a is None else a, replace=True)
