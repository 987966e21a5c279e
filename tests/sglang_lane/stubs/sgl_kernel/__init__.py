"""Import-only stand-in for SGLang's CUDA/AMX kernel package (CPU test lane only; see ../README.md).

Any attribute is a function that raises NotImplementedError when called: if a code path really
needs a kernel, the lane fails loudly instead of computing something else.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*_args, **_kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the CPU test lane (stand-in module)")

    missing.__name__ = name
    return missing
