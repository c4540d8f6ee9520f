import sys

from msf.cli import main

sys.exit(main())
