import sys

from msf.interfaces.cli import main

sys.exit(main())
