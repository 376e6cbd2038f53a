import sys

from omnikv.cli import main

sys.exit(main())
