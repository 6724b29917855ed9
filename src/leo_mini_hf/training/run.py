"""`leo-mini train`: the HF Trainer on a LEO-MINI checkpoint, with every TrainingArguments flag."""

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..easyvqa.dataset import EasyVQADataset
from ..folders import remove_if_empty, require_path
from ..hub.checkpoint_folder import add_remote_code
from ..hub.model_card import EASY_VQA, card_facts, write_model_card
from ..modeling import LeoMiniForConditionalGeneration
from ..modeling.modeling_leo_mini import PARAMETER_PARTS
from ..modeling.weight_check import INCOMPLETE_MARKER
from ..processor import LeoMiniProcessor
from .collator import LeoMiniDataCollator
from .data import LlavaConversationDataset
from .elastic import BUDGET_LOSSES
from .feature_cache import VisionFeatureCache
from .loss_curve import write_loss_curve
from .stages import apply_training_stage, format_parameter_table
from .trainer import LeoMiniTrainer


QUANTIZE_CHOICES = ("8bit", "4bit")


def quantized_loading(quantize: str | None, device) -> dict:
    """`from_pretrained` keywords for `--quantize`: bitsandbytes 8-bit or 4-bit nf4 on the training device."""
    if quantize is None:
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if quantize == "8bit" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return {"quantization_config": config, "device_map": {"": str(device)}}


@dataclass
class TrainScriptArguments:
    """`leo-mini train` options beyond TrainingArguments."""

    model: str = field(metadata={"help": "LEO-MINI checkpoint folder"})
    data: str = field(metadata={"help": "LLaVA conversation JSON file, or 'easy-vqa'"})
    image_root: str | None = field(default=None, metadata={"help": "folder the JSON's image paths are relative to"})
    split: str = field(default="train", metadata={"help": "easy-vqa split"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N samples"})
    stage: str = field(default="finetune", metadata={"help": "pretrain | finetune | full"})
    max_length: int | None = field(default=None, metadata={"help": "truncate samples to this many tokens"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip (and report) malformed records"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "write into a non-empty --output_dir (never into the --model folder)"})
    budget_weights: str | None = field(
        default=None,
        metadata={"help": "elastic models (cotr_budgets): comma-separated sampling weights, one per budget, e.g. "
                          "'1,1,2' (default: uniform); each optimizer step trains at one drawn budget"},
    )
    budget_loss: str = field(
        default="sampled",
        metadata={"help": "elastic models: 'sampled' (one budget drawn per step) or 'summed' (every step trains at "
                          "every budget, the losses weighted by --budget_weights; one pass per budget)",
                  "choices": list(BUDGET_LOSSES)},
    )
    part_learning_rates: str | None = field(
        default=None,
        metadata={"help": "own learning rates for model parts, comma-separated part=rate, e.g. 'token_reducer=3e-3' "
                          f"(parts: {', '.join(PARAMETER_PARTS)}); the rest train at --learning_rate, all on one "
                          "schedule"},
    )
    quantize: str | None = field(
        default=None,
        metadata={"help": "load the model's LLM and vision experts quantized with bitsandbytes ('8bit' or '4bit', nf4) "
                          "and train LEO-MINI's own unquantized parts on that frozen base, as QLoRA does (stage "
                          "finetune or pretrain); the final save is a quantized checkpoint",
                  "choices": list(QUANTIZE_CHOICES)},
    )
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "cache the frozen vision experts' outputs in this folder and reuse them across epochs and "
                          "runs (keyed by image content and expert; off by default)"},
    )


def check_output_dir(model_dir, output_dir, resuming: bool, overwrite: bool) -> None:
    """Refuse to train into the model's own folder (the final save would overwrite the weights being trained from)
    or into a non-empty folder, unless resuming its checkpoints or told to overwrite."""
    model_dir, output_dir = Path(model_dir).resolve(), Path(output_dir).resolve()
    if output_dir == model_dir:
        raise ValueError(f"--output_dir {output_dir} is the --model folder: training would overwrite the model it "
                         "starts from; choose another folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (resuming or overwrite):
        raise ValueError(f"--output_dir {output_dir} is not empty: resume its checkpoints with "
                         "--resume_from_checkpoint, pass --overwrite_output_dir to write into it anyway, or choose a "
                         "new folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file")


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
LAST_CHECKPOINT = ("last", "true", "True")


def checkpoint_is_complete(folder: Path) -> bool:
    """The Trainer writes `trainer_state.json` last: a checkpoint without it (or with it cut short) was interrupted."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def resolve_resume_checkpoint(requested: str | None, output_dir) -> str | None:
    """The checkpoint `--resume_from_checkpoint` resumes from: a complete `checkpoint-N` folder as given; for
    'last' (or 'true') or the output folder itself, its last complete checkpoint; for an interrupted checkpoint,
    the last complete one before it. Interrupted checkpoints passed over are reported."""
    if requested is None:
        return None
    path = Path(output_dir) if requested in LAST_CHECKPOINT else Path(requested)
    match = CHECKPOINT_NAME.match(path.name)
    if match and checkpoint_is_complete(path):
        return str(path)
    parent, before = (path.parent, int(match[1])) if match else (path, None)
    if not parent.is_dir():
        raise ValueError(f"--resume_from_checkpoint {requested}: {parent} is not a folder")
    candidates = sorted((int(m[1]), folder) for folder in parent.iterdir()
                        if (m := CHECKPOINT_NAME.match(folder.name)) and folder.is_dir()
                        and (before is None or int(m[1]) <= before))
    for step, folder in reversed(candidates):
        if checkpoint_is_complete(folder):
            return str(folder)
        print(f"skipping {folder}: its save was interrupted (no complete trainer_state.json)")
    raise ValueError(f"--resume_from_checkpoint {requested}: no complete checkpoint-N folder in {parent}")


def parse_part_learning_rates(text: str | None) -> dict[str, float] | None:
    """'token_reducer=3e-3,projector=1e-3' → {"token_reducer": 0.003, "projector": 0.001}; the trainer checks the
    parts and rates."""
    if text is None:
        return None
    rates = {}
    for item in text.split(","):
        part, separator, rate = item.partition("=")
        try:
            if not separator:
                raise ValueError
            rates[part.strip()] = float(rate)
        except ValueError as error:
            raise ValueError(f"--part_learning_rates must be comma-separated part=rate items, e.g. "
                             f"'token_reducer=3e-3'; got {text!r}") from error
    return rates


def run_training(argv: list[str]) -> None:
    """Parse `argv` (TrainScriptArguments + TrainingArguments), train, and save a checkpoint that loads anywhere."""
    parser = HfArgumentParser((TrainScriptArguments, TrainingArguments))
    script, training = parser.parse_args_into_dataclasses(argv)
    training.remove_unused_columns = False  # the collator needs the raw samples
    require_path(script.model, "The model")
    check_output_dir(script.model, training.output_dir, bool(training.resume_from_checkpoint),
                     script.overwrite_output_dir)
    training.resume_from_checkpoint = resolve_resume_checkpoint(training.resume_from_checkpoint, training.output_dir)
    output_dir_existed = Path(training.output_dir).exists()
    try:
        train_and_save(script, training)
    except BaseException:
        if not output_dir_existed:
            remove_if_empty(training.output_dir)  # a failed run leaves no empty --output_dir behind
        raise


def train_and_save(script: TrainScriptArguments, training: TrainingArguments) -> None:
    model = LeoMiniForConditionalGeneration.from_pretrained(script.model,
                                                            **quantized_loading(script.quantize, training.device))
    processor = LeoMiniProcessor.from_pretrained(script.model)
    if script.data == "easy-vqa":
        dataset = EasyVQADataset(split=script.split, limit=script.limit)
    else:
        dataset = LlavaConversationDataset(script.data, script.image_root, skip_bad_records=script.skip_bad_records)
        if dataset.skipped:
            print(f"skipped {len(dataset.skipped)} bad record(s); first: {dataset.skipped[0]}")
        if script.limit:
            dataset.samples = dataset.samples[: script.limit]
    print(f"stage '{script.stage}':\n" + format_parameter_table(apply_training_stage(model, script.stage)))
    feature_cache = None
    if script.feature_cache_dir:
        feature_cache = VisionFeatureCache(script.feature_cache_dir)
        feature_cache.attach(model)
    budget_weights = None
    if script.budget_weights is not None:
        try:
            budget_weights = [float(weight) for weight in script.budget_weights.split(",")]
        except ValueError as error:
            raise ValueError(f"--budget_weights must be comma-separated numbers, got {script.budget_weights!r}") \
                from error
    trainer = LeoMiniTrainer(model=model, args=training, train_dataset=dataset,
                             data_collator=LeoMiniDataCollator(processor, script.max_length),
                             processing_class=processor, budget_weights=budget_weights, budget_loss=script.budget_loss,
                             part_learning_rates=parse_part_learning_rates(script.part_learning_rates))
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    if feature_cache is not None:
        feature_cache.detach(model)
        print(f"feature cache {script.feature_cache_dir}: {feature_cache.stats()}")
    known = card_facts(script.model)  # what the source checkpoint's card knew, and the data trained on here
    card = {"base_models": known["base_models"],
            "datasets": known["datasets"] + ([EASY_VQA] if script.data == "easy-vqa" else [])}
    save_final_model(trainer, Path(training.output_dir), card)


def save_final_model(trainer, output_dir: Path, card: dict | None = None) -> None:
    """The trained model, processor, remote code and model card (`card`: as `write_model_card` takes it) into
    `output_dir` beside its checkpoints, with `trainer_state.json` and the loss curve (`loss_curve.png`). Until all
    are written the folder holds the partial-folder marker, so a save cut short is refused on load, never used
    half-written."""
    marker = output_dir / INCOMPLETE_MARKER
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        write_model_card(trainer.model, output_dir, **(card or {}))
        add_remote_code(output_dir)
        marker.unlink()
