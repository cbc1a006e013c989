"""gpt-oss models: presets, checkpoint loading (incl. MXFP4), tokenizer, fused MoE."""

from ossforge.model.presets import PRESETS, build_random, make_config, preset_names

__all__ = ["PRESETS", "build_random", "make_config", "preset_names", "fuse_moe"]


def __getattr__(name):
    # Lazy so `import ossforge.model` does not pull in the kernels.
    if name == "fuse_moe":
        from ossforge.model.fused_moe import fuse_moe

        return fuse_moe
    raise AttributeError(name)
