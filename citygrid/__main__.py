import sys

from citygrid.cli import main

sys.exit(main())
