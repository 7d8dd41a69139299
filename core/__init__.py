"""The neutral core every layer builds on: the quantization spec and artifact (`spec`), the pure quantizer maths
and range rules (`quant`), and the registry type (`registry`). Imports nothing of the project."""
