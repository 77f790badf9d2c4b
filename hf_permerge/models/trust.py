"""What a model folder may bring before transformers reads it: never code. A folder whose config or tokenizer names
custom code (`auto_map`, `custom_pipelines`) is refused from its JSON alone, before any transformers load could
import it; every load passes `trust_remote_code=False` on its own line, so nothing ever prompts either."""

from __future__ import annotations

import json
from pathlib import Path

_CODE_KEYS = ("auto_map", "custom_pipelines")
_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
    "generation_config.json",
)
"""The files transformers' Auto classes read a folder's classes from."""

FIX = (
    "hf_permerge never runs a model folder's code (trust_remote_code=False): save the model with a "
    "transformers architecture (save_pretrained of a model transformers ships), without auto_map"
)


def read_json(path: Path) -> dict:
    """A folder's JSON file as a dict; a damaged one is a ValueError naming it and the fix."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); save or download the model again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object; save or download the model again")
    return data


def check_no_remote_code(folder: str | Path) -> None:
    """Refuse a folder whose config, tokenizer or processor files name custom code, naming the file and the code."""
    folder = Path(folder)
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = read_json(path)
        for key in _CODE_KEYS:
            if data.get(key):
                named = data[key]
                what = ", ".join(f"{k}: {v}" for k, v in named.items()) if isinstance(named, dict) else str(named)
                raise ValueError(f"refusing {folder}: its {name} names custom code ({key}: {what}); {FIX}")
