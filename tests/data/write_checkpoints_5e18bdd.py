"""Writes tests/data/checkpoint-5e18bdd-*: tiny checkpoints saved by leo-mini-hf at commit 5e18bdd (before the #19
redesign), with the logits that code computed on them. Run with that commit installed:
    git checkout 5e18bdd && python tests/data/write_checkpoints_5e18bdd.py tests/data"""
import json, sys
from pathlib import Path
import torch
from leo_mini_hf import LeoMiniConfig, LeoMiniForConditionalGeneration

out_root = Path(sys.argv[1])
small_text = dict(LeoMiniConfig.from_preset("tiny").text_config.to_dict())
small_text = {k: small_text[k] for k in ("model_type", "vocab_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings", "pad_token_id",
              "bos_token_id", "eos_token_id", "tie_word_embeddings")}
small_text.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
variants = {
    "default": {},
    "options": {"cotr_score_scaling": "cosine", "cotr_position_embedding": True, "cotr_text_conditioning": False,
                "mmoe_router_uses_hidden_state": False},
    "avg-pool": {"token_reduction": "avg_pool", "mmoe_num_experts": 0},
}
for name, overrides in variants.items():
    config = LeoMiniConfig.from_preset("tiny", text_config=small_text, cotr_projection_dim=8, **overrides)
    torch.manual_seed(0)
    model = LeoMiniForConditionalGeneration(config).eval()
    with torch.no_grad():  # trained-looking adapters: every part changes the logits
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name or "position_embeddings" in param_name:
                param.normal_(0.0, 0.5)
    folder = out_root / f"checkpoint-5e18bdd-{name}"
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    ids = torch.tensor([[1, 10, 11] + [config.image_token_id] * config.num_image_tokens + [12, 13, 14]])
    pixels = torch.linspace(-1, 1, 3 * config.image_size**2).reshape(1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
    (folder / "expected_logits.json").write_text(json.dumps({"input_ids": ids.tolist(), "logits": logits.tolist()}))
