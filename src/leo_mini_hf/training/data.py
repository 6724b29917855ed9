"""LLaVA conversation JSON as chat samples: `{"messages": [...]}` with image paths inside the image blocks."""

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..processor.image_processing_leo_mini import to_rgb_image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


def _image_block(path: Path) -> dict:
    return {"type": "image", "path": str(path)}


def conversation_to_messages(turns: list, image_path: Path | None) -> list[dict]:
    """LLaVA turns (`from`/`value`, `<image>` in the text) → chat messages with typed content blocks."""
    messages = []
    for turn in turns:
        role, text = ROLES[turn["from"]], turn["value"]
        content = []
        if IMAGE_PLACEHOLDER in text:
            content.append(_image_block(image_path))
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def check_image(path: Path, decode: bool = False) -> None:
    """That `path` is an image PIL can open: its header (cheap; the pixels are decoded at training time), or with
    `decode` its whole pixel data, read as training reads it (a truncated or corrupt file fails here, also when
    another library set PIL's LOAD_TRUNCATED_IMAGES, as lmms-eval does)."""
    try:
        if decode:
            to_rgb_image(str(path))
        else:
            with Image.open(path) as image:
                image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"image {path} is not a readable image: {error}") from error


@dataclass
class SkippedRecord:
    index: int
    record_id: str
    reason: str


class LlavaConversationDataset(Dataset):
    """LLaVA conversation JSON (`[{"image": "rel/path.jpg", "conversations": [{"from": "human", ...}]}]`).

    Every record is checked when the dataset is built: a malformed record or a missing image raises a
    `ValueError` naming it, or, with `skip_bad_records=True`, is left out and listed in `skipped`. Skipping decodes
    every image once here (a truncated file is skipped too); otherwise only image headers are read, and a file that
    fails to decode stops training with the records of its batch.
    """

    def __init__(self, json_path, image_root=None, skip_bad_records: bool = False):
        json_path = Path(json_path)
        self.image_root = Path(image_root) if image_root is not None else json_path.parent
        try:
            records = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_path} is not valid JSON: {error}") from error
        if not isinstance(records, list):
            raise ValueError(f"{json_path} must hold a JSON list of records, got {type(records).__name__}")
        self.decode_images = skip_bad_records
        self.samples: list[list[dict]] = []
        self.record_ids: list[str] = []
        self.skipped: list[SkippedRecord] = []
        for index, record in enumerate(records):
            record_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
            try:
                self.samples.append(self._parse(record))
                self.record_ids.append(record_id)
            except ValueError as error:
                if not skip_bad_records:
                    raise ValueError(f"{json_path}: record {index} (id {record_id}): {error}") from error
                self.skipped.append(SkippedRecord(index, record_id, str(error)))
        if not self.samples:
            skipped = f": all {len(self.skipped)} were skipped, first {self.skipped[0]}" if self.skipped else ""
            raise ValueError(f"{json_path} holds no record to train on{skipped}")

    def _parse(self, record) -> list[dict]:
        if not isinstance(record, dict):
            raise ValueError("a record must be a JSON object")
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversations' must be a non-empty list")
        for turn in turns:
            if (not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in ROLES
                    or not isinstance(turn.get("value"), str)):
                raise ValueError(f"malformed turn {turn!r}: needs 'from' in {sorted(ROLES)} and a string 'value'")
        if not any(ROLES[turn["from"]] == "assistant" for turn in turns):
            raise ValueError("no assistant ('gpt') turn to learn from")
        placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
        image_path = None
        if record.get("image") is not None:
            if not isinstance(record["image"], str):
                raise ValueError(f"'image' must be a path string, got {record['image']!r}")
            image_path = self.image_root / record["image"]
            if not image_path.is_file():
                raise ValueError(f"image not found: {image_path}")
            check_image(image_path, decode=self.decode_images)
            if placeholders == 0:  # LLaVA convention: the image goes before the first question
                turns = [dict(turns[0], value=f"{IMAGE_PLACEHOLDER}\n{turns[0]['value']}"), *turns[1:]]
                placeholders = 1
        if placeholders != (1 if image_path else 0):
            raise ValueError(f"{placeholders} '<image>' placeholders for {1 if image_path else 0} image(s)")
        return conversation_to_messages(turns, image_path)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {"messages": self.samples[index], "id": self.record_ids[index]}
