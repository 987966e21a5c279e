import sys

from draft_trainer.cli import main

sys.exit(main())
