import sys

from ctlive.cli import main

sys.exit(main())
