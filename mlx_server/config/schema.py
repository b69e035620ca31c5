"""The JSON Schema of models.yaml (docs/models.schema.json, for editors), generated from the typed tree.

`python -m mlx_server.config.schema > docs/models.schema.json` regenerates it; a test checks the file is current.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mlx_server.config.tree import Config


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(json_schema_text())
