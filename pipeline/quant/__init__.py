"""INT8 quantization: the calibration set and cache (calibration), ONNX Runtime static QDQ (onnx_qdq),
torchao PT2E with the X86 Inductor quantizer (torchao_pt2e), and the GPU int8 item table (int8_table)."""
