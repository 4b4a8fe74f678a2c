import sys

from nodemesh.cli import main

sys.exit(main())
