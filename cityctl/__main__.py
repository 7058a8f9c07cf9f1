import sys

from cityctl.cli import main

sys.exit(main())
