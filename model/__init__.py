"""The failure model: inputs and derived features, the package (ONNX + manifest), validation and scoring."""
