"""lmms-eval task YAMLs for easy-vqa and the object-named mosaics, built offline from the installed easy-vqa package.

    lmms-eval --model leo_mini --model_args pretrained=DIR --tasks easy_vqa --include_path "$(python -m
    leo_mini_hf.lmms_eval_tasks)"
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
