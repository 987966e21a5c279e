"""SGLang backend, split by job: pre-flight checks (preflight.py), one rank's ModelRunner
(runner.py), tensor-parallel worker processes (workers.py), the Backend itself (backend.py).

Importing this package never imports SGLang: that happens only when a backend is built.
"""

from target_server.backends.sglang.backend import SGLangBackend, read_frozen_tensors
from target_server.backends.sglang.preflight import SUPPORTED_SGLANG, check_capturable, check_sglang_version
from target_server.backends.sglang.runner import MAX_SEQS_PER_FORWARD

__all__ = ["MAX_SEQS_PER_FORWARD", "SUPPORTED_SGLANG", "SGLangBackend", "check_capturable", "check_sglang_version",
           "read_frozen_tensors"]
