"""Quantized checkpoints made elsewhere (GGUF, GPTQ, AutoAWQ GEMM) read into the common artifact, and the
`method=checkpoint` that evaluates one against its base model on the same tokens as every other run.

Importing this package registers every reader in it (a new format is a module that decorates its reader class with
`@register_reader(name)`) and the checkpoint method.
"""
import importlib
import pkgutil

from checkpoints.base import READERS, CheckpointError, CheckpointReader, Contents, Description, Header

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["READERS", "CheckpointError", "CheckpointReader", "Contents", "Description", "Header"]
