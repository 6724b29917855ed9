"""The dtypes the commands take by name (`leo-mini export --dtype`, lmms-eval's `dtype=`)."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str, option: str) -> torch.dtype:
    """The torch dtype called `name`, or a ValueError naming `option` and the choices."""
    if name not in DTYPES:
        raise ValueError(f"{option} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
