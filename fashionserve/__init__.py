"""Shared code for the fashion model serving repository: networks, pre/post-processing,
ONNX export, the ONNX Runtime model runner and the embedded Triton launcher."""
