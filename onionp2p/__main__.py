import sys

from onionp2p.cli import main

sys.exit(main())
