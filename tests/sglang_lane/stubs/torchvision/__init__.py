"""Import-only torchvision stand-in for the SGLang CPU test lane (see ../README.md)."""

from torchvision._missing import module_getattr

# An old version on purpose: transformers then never chooses torchvision-backed image processors.
__version__ = "0.0.0+specrelay.stub"
__getattr__ = module_getattr(__name__)
