import sys

from fastprompt.cli import main

sys.exit(main())
