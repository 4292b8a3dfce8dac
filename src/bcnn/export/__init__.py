"""Export bcnn models to ONNX (run by onnxruntime) and QONNX (Brevitas / FINN's dialect).

>>> from bcnn.models import create_model
>>> from bcnn.export import to_onnx
>>> path = to_onnx(create_model("bcnn_cifar", width=8, depth=1), "/tmp/bcnn.onnx")  # doctest: +SKIP

Input: uint8 images NCHW (0..255); output: the model's float logits, equal to torch's. The
graph keeps the project's conventions: sign(0) = +1, one-padding of binary convolutions, the
exact bit-plane stem, k-bit layers on their integer grids. See docs/export.md. Needs the
optional extra: ``pip install 'bcnn[export]'`` (onnx, onnxruntime, qonnx); importing this
package imports none of them.
"""

from ._api import DEFAULT_OPSET, build, export, to_onnx, to_qonnx

__all__ = ["DEFAULT_OPSET", "build", "export", "to_onnx", "to_qonnx"]
