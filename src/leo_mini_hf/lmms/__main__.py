"""`python -m leo_mini_hf.lmms` prints the folder to pass to lmms-eval's --include_path."""

from . import TASKS_DIR

print(TASKS_DIR)
