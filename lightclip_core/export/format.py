"""The layout of an export directory: file names and the format version of its `config.json`.

Shared by the exporter and the loader; the loader must not import the exporter (which pulls in training code).
"""
from __future__ import annotations

FORMAT_VERSION = 2  # 2: weights of the reparameterized model, torch.export programs, tokenizer vocabulary
WEIGHTS_FILE = "model.safetensors"
WISE_FT_FILE = "wise_ft.safetensors"  # a run started from weights: both unfolded endpoints (export/wise_ft.py)
EXPORT_ARTIFACT = "export"  # the export directory's name among a registered (pyfunc) model's artifacts
CONFIG_FILE = "config.json"
PARITY_FILE = "parity.json"
TOKENIZER_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
ENCODERS = ("image_encoder", "text_encoder")
ENCODER_INPUTS = {"image_encoder": "image", "text_encoder": "text"}
ONNX_FILES = {name: f"{name}.onnx" for name in ENCODERS}
PROGRAM_FILES = {name: f"{name}.pt2" for name in ENCODERS}
ONNX_INPUTS = ENCODER_INPUTS
ONNX_OUTPUT = "embedding"
