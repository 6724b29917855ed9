"""Run by tests under torchrun: the tiny LEO-MINI sharded with FSDP2 (`fully_shard`, gloo, CPU) takes SGD steps on
its share of a batch; rank 0 also takes the same steps unsharded on the whole batch and reports both."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, sys.argv[1])  # the tests folder
from helpers.tiny_models import image_prompt, random_pixels, tiny_model  # noqa: E402

from leo_mini_hf.training.stages import apply_training_stage  # noqa: E402

STEPS, BATCH = 2, 4


def batch(config):
    """BATCH identical samples: each rank's half has the full batch's routing statistics, so the MMoE balance loss
    (a product of means) of a half equals the whole batch's."""
    input_ids = torch.tensor([image_prompt(config) + [20, 21, 2]] * BATCH)
    labels = input_ids.clone()
    labels[:, :-3] = -100
    return input_ids, labels, random_pixels(config).repeat(BATCH, 1, 1, 1)


def train(model, input_ids, labels, pixels) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=input_ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model().train()
    apply_training_stage(model, "finetune")
    input_ids, labels, pixels = batch(model.config)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    sharded_losses = train(model, input_ids[share], labels[share], pixels[share])
    for loss in sharded_losses:
        dist.all_reduce(loss)
    sharded = {name: param.full_tensor() for name, param in model.named_parameters()}
    if rank == 0:
        reference = tiny_model().train()
        apply_training_stage(reference, "finetune")
        reference_losses = train(reference, input_ids, labels, pixels)
        difference = max((sharded[name] - param).abs().max().item() for name, param in reference.named_parameters())
        initial = tiny_model().state_dict()
        trained = max((param - initial[name]).abs().max().item() for name, param in reference.named_parameters())
        print(json.dumps({"world_size": world, "sharded_losses": [loss.item() / world for loss in sharded_losses],
                          "losses": [loss.item() for loss in reference_losses], "max_parameter_difference": difference,
                          "max_parameter_change": trained,
                          "sharded_parameter_type": type(dict(model.named_parameters())["lm_head.weight"]).__name__}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
