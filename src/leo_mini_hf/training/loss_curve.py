"""The training loss as a PNG next to `trainer_state.json`, drawn with PIL (no plotting library needed)."""

from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 400, 56


def loss_points(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every training log entry (`TrainerState.log_history`), in step order."""
    return sorted((entry["step"], float(entry["loss"])) for entry in log_history if "loss" in entry and "step" in entry)


def write_loss_curve(log_history: list[dict], path) -> Path | None:
    """Draw the logged training loss against the step into `path` (PNG); None when fewer than two losses were
    logged (nothing to draw)."""
    points = loss_points(log_history)
    if len(points) < 2:
        return None
    steps, losses = [step for step, _ in points], [loss for _, loss in points]
    low, high = min(losses), max(losses)
    span_loss = (high - low) or 1.0
    span_steps = (steps[-1] - steps[0]) or 1

    def position(step: int, loss: float) -> tuple[float, float]:
        x = MARGIN + (step - steps[0]) / span_steps * (WIDTH - 2 * MARGIN)
        y = HEIGHT - MARGIN - (loss - low) / span_loss * (HEIGHT - 2 * MARGIN)
        return x, y

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(MARGIN, MARGIN), (MARGIN, HEIGHT - MARGIN), (WIDTH - MARGIN, HEIGHT - MARGIN)], fill="black")
    draw.line([position(step, loss) for step, loss in points], fill=(31, 119, 180), width=2)
    draw.text((MARGIN, MARGIN // 3), "training loss", fill="black")
    draw.text((4, MARGIN - 6), f"{high:.3g}", fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), f"{low:.3g}", fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 8), f"step {steps[0]}", fill="black")
    draw.text((WIDTH - MARGIN - 60, HEIGHT - MARGIN + 8), f"step {steps[-1]}", fill="black")
    path = Path(path)
    image.save(path)
    return path
