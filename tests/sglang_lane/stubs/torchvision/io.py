"""torchvision stand-in (CPU test lane; see tests/sglang_lane/stubs/README.md)."""

from torchvision._missing import module_getattr

__getattr__ = module_getattr(__name__)
