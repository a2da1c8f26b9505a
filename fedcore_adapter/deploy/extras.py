"""Which packages each runtime needs, and the one-line refusal naming the extra that installs them."""
from __future__ import annotations

import importlib.util

from ..errors import ConfigError

# runtime -> the packages it needs (installed by the ``deploy`` extra; torchao is a core dependency)
PACKAGES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnx", "onnxruntime"),
    "openvino": ("openvino", "nncf"),
    "torch_compile": ("torchao",),
}


def require_extra(runtime: str) -> None:
    """Refuse ``runtime`` in one line naming the extra when its packages are not installed (nothing imported)."""
    missing = [p for p in PACKAGES[runtime] if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"runtime {runtime} needs {', '.join(missing)}, which is not installed; "
                          f"install the deploy extra: pip install 'fedcore-adapter[deploy]'")
