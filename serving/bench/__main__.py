import sys

from serving.bench.cli import main

sys.exit(main())
