import sys

from hexray.warm import main

sys.exit(main())
