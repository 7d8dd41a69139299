"""Quantization methods.

Importing this package imports every module and subpackage in it, so a new method is added by dropping a file here
that decorates its class with `@register_method(name, ConfigDataclass)` and adding conf/method/<name>.yaml.
"""
import importlib
import pkgutil

from methods.base import METHODS, Method, QuantizationResult, build_method, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "QuantizationResult", "build_method", "register_method"]
