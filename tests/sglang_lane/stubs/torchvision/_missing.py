"""Placeholders for torchvision names: importable, attribute-chainable, fail loudly when called."""


class Missing:
    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{self._path}.{name}")

    def __call__(self, *_args, **_kwargs):
        raise NotImplementedError(f"{self._path} is not available in the CPU test lane (torchvision stand-in)")

    def __mro_entries__(self, _bases):  # allows `class X(torchvision.Something)` at import time
        return (object,)


def module_getattr(modname: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{modname}.{name}")

    return __getattr__
