"""Run by tests under torchrun: a few Trainer steps on identical samples, then each rank reports its weights."""

import hashlib
import json
import sys

import torch

import leo_mini_hf  # noqa: F401  (registers the Auto classes)
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.training.collator import LeoMiniDataCollator
from leo_mini_hf.training.stages import apply_training_stage
from leo_mini_hf.training.trainer import LeoMiniTrainer, default_training_arguments

sys.path.insert(0, sys.argv[4])
from helpers.training_data import colour_sample  # noqa: E402

checkpoint, output_dir, per_device_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra_arguments = {"fsdp": True} if sys.argv[5:] == ["fsdp"] else {}  # FSDP asked for, on CPU
torch.manual_seed(0)
model = LeoMiniForConditionalGeneration.from_pretrained(checkpoint)
processor = LeoMiniProcessor.from_pretrained(checkpoint)
apply_training_stage(model, "finetune")
args = default_training_arguments(output_dir=output_dir, per_device_train_batch_size=per_device_batch, max_steps=4,
                                  learning_rate=5e-3, logging_steps=1, save_strategy="no", seed=0,
                                  ddp_backend="gloo", use_cpu=True, train_sampling_strategy="sequential",
                                  **extra_arguments)
trainer = LeoMiniTrainer(model=model, args=args, train_dataset=[colour_sample("red")] * 16,
                         data_collator=LeoMiniDataCollator(processor), processing_class=processor)
trainer.train()
trainer.save_model()
digest = hashlib.sha256()
for name, param in sorted(model.named_parameters()):
    digest.update(param.detach().numpy().tobytes())
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
with open(f"{output_dir}/rank{trainer.args.process_index}.json", "w") as handle:
    json.dump({"losses": losses, "digest": digest.hexdigest(), "world_size": trainer.args.world_size}, handle)
# Tear the gloo process group down before the interpreter exits: left to interpreter shutdown, a rank can abort
# ("terminate called without an active exception") after its work is done.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
