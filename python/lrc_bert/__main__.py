"""``python -m lrc_bert`` (also under ``torchrun -m lrc_bert``): the ``lrc-bert`` command."""

import sys

from .cli import main

sys.exit(main())
