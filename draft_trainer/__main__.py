import sys

from draft_trainer.cli import console_main

sys.exit(console_main())
