import sys

from mimlib.cli import main

sys.exit(main())
