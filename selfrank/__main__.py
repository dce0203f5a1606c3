"""``python -m selfrank ...`` (also ``accelerate launch -m selfrank run CONFIG``): the command line."""
import sys

from selfrank.launch.cli import main

sys.exit(main())
