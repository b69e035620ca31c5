import sys

from mlx_server.cli import main

sys.exit(main())
