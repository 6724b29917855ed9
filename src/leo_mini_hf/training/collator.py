"""Batches for training: chat template → tokens, images → pixel_values, loss only on assistant answers."""

from dataclasses import dataclass

import torch


@dataclass
class LeoMiniDataCollator:
    """Samples `{"messages": [...]}` → `input_ids`, `attention_mask`, `labels` (and `pixel_values` with images).

    Labels are -100 everywhere but the assistant turns marked by the chat template's `{% generation %}`; padding
    and image tokens are never labelled. Padding is on the right for training.
    """

    processor: object
    max_length: int | None = None
    num_visual_tokens: int | None = None  # an elastic model's budget for every batch (default: its largest)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        processor_kwargs = {"padding": True, "padding_side": "right"}
        if self.num_visual_tokens is not None:
            processor_kwargs["num_visual_tokens"] = self.num_visual_tokens
        if self.max_length is not None:
            processor_kwargs.update(truncation=True, max_length=self.max_length)
        try:
            batch = self.processor.apply_chat_template(
                [sample["messages"] for sample in samples],
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                return_assistant_tokens_mask=True,
                processor_kwargs=processor_kwargs,
            )
        except ValueError as error:  # e.g. a truncated image file: say which records the batch held
            ids = [str(sample["id"]) for sample in samples if "id" in sample]
            raise ValueError(f"{error} (in a batch of records {ids})" if ids else str(error)) from error
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        labels = input_ids.masked_fill(batch["assistant_masks"] == 0, -100)
        labels = labels.masked_fill(attention_mask == 0, -100)
        labels = labels.masked_fill(input_ids == self.processor.image_token_id, -100)
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for name in ("pixel_values", "text_condition_mask"):  # text_condition_mask: models with cotr_text_source="user"
            if name in batch:
                features[name] = batch[name]
        return features
