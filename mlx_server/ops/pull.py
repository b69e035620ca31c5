"""`mlx-server pull` and `preload`'s way to the weights. The download and verify logic itself lives in
mlx_server.models.pull, because the HTTP API's /api/pull needs it too and api/ never imports ops/; this module is
the name the CLI imports it by. With progress=None, huggingface-hub draws its own progress bars on stderr.
"""

from __future__ import annotations

from mlx_server.models.pull import PullError, PullResult, ensure_local

__all__ = ["PullError", "PullResult", "ensure_local"]
