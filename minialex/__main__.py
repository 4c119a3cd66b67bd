"""`python -m minialex ...`: the same command as the `minialex` console script."""
import sys

from .cli import main

sys.exit(main())
