import sys

from hexray.cli import main

sys.exit(main())
