import sys

from target_server.entry import console_main

# Guarded: the sglang backend's tensor-parallel workers use multiprocessing "spawn", which
# re-imports the main module in each child.
if __name__ == "__main__":
    sys.exit(console_main())
