"""DeepSpeed LoRA trainer (not built yet)."""

from ossforge.errors import UserError


def train(config, resume=False, config_path=None):
    raise UserError(f"{config_path}: training is not implemented yet")
