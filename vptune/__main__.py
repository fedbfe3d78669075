import sys

from vptune.cli import main

sys.exit(main())
