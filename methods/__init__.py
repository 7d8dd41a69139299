"""Quantization methods.

Importing this package imports every module in it, so a new method is added by dropping a file here
that decorates its class with `@register_method(name, ConfigDataclass)` and adding conf/method/<name>.yaml.
"""
import importlib
import pkgutil

from methods.base import METHOD_CONFIGS, METHODS, Method, QuantizedWeights, QuantSpec, build_method, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "quant"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "METHOD_CONFIGS", "Method", "QuantSpec", "QuantizedWeights", "build_method", "register_method"]
