"""epmq: expert-guided post-merge quantization (E-PMQ, arXiv 2605.16882) in PyTorch Lightning."""

from omegaconf import OmegaConf

__version__ = "0.2.0"

# `${epmq.either:a,b}` is a unless a is null, else b: the run folder is the resumed run's, or a new one.
OmegaConf.register_new_resolver("epmq.either", lambda a, b: b if a is None else a, replace=True)


def _suite_default(name: str, _root_):
    """`${epmq.suite_default:symmetric}`: a default the run's suite class sets (epmq.families.base.Suite), read from
    the class `suite._target_` names, without making the suite."""
    from hydra.utils import get_class

    return getattr(get_class(_root_.suite._target_), name)


OmegaConf.register_new_resolver("epmq.suite_default", _suite_default, replace=True)


def __getattr__(name: str):
    # `from epmq import load_quantized` without importing torch and transformers at `import epmq`
    # (train.py imports the package before Hydra starts)
    if name == "load_quantized":
        from epmq.io.load import load_quantized

        return load_quantized
    raise AttributeError(f"module 'epmq' has no attribute {name!r}")
