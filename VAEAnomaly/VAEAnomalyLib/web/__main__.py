"""`python -m VAEAnomalyLib.web`: the same as the `vaeanomaly-web` console script."""
import sys

from VAEAnomalyLib.web import main

sys.exit(main())
