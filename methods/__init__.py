"""Quantization methods. Importing this package registers every built-in method."""
from methods.base import METHOD_CONFIGS, METHODS, Method, QuantizedWeights, QuantSpec, build_method, register_method

__all__ = ["METHODS", "METHOD_CONFIGS", "Method", "QuantSpec", "QuantizedWeights", "build_method", "register_method"]
