"""LEO-MINI in lmms-eval: the `leo_mini` model (`model.py`, registered through the `lmms_eval.models` entry point)
and task YAMLs for easy-vqa and the object-named mosaics, built offline from the installed easy-vqa package
(`tasks.py`).

    lmms-eval --model leo_mini --model_args pretrained=DIR --tasks easy_vqa --include_path "$(python -m
    leo_mini_hf.lmms)"
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
