"""The `dflash` package's reference HF model class (PyPI dflash==0.1.0, z-lab), imported straight
from its wheel: it is pure Python and needs only torch + transformers at import, while its
declared dependencies pin exact tqdm/datasets/requests versions we do not install. The wheel is
taken from $DFLASH_WHEEL, else the asset cache, else downloaded there with `pip download --no-deps`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from draft_trainer.assets.fetch import cache_dir

WHEEL = "dflash-0.1.0-py3-none-any.whl"


def reference_wheel() -> Path:
    env = os.environ.get("DFLASH_WHEEL")
    if env:
        return Path(env)
    dest = cache_dir() / "wheels"
    wheel = dest / WHEEL
    if not wheel.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "dflash==0.1.0",
                              "-d", str(dest)], capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"cannot fetch the dflash reference wheel ({res.stderr[-500:]}); "
                               f"download {WHEEL} from PyPI and set DFLASH_WHEEL to it")
    return wheel


def reference_model_module():
    """dflash.model (the reference DFlashDraftModel), imported from the wheel."""
    path = str(reference_wheel())
    if path not in sys.path:
        sys.path.insert(0, path)
    import dflash.model

    return dflash.model
