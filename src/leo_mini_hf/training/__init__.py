"""Fine-tuning LEO-MINI with the HF Trainer: data, collator, training stages, trainer."""
