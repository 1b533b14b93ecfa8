"""``python -m lorakit`` (and ``torchrun ... -m lorakit train ...``): the ``lorakit`` command line.
It needs the app's packages (``pip install 'lorakit[app]'``); ``import lorakit`` never loads this."""

import sys

from lorakit.app.cli import main

sys.exit(main())
