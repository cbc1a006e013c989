"""ossforge: fine-tune gpt-oss MoE models into domain variants and serve them to tool-using agents.

The names users import live in the subpackages: ``ossforge.model.fuse_moe`` and
``ossforge.agents.ChatGptOss``. Importing ``ossforge`` itself stays cheap (no torch).
"""

__version__ = "0.1.0"
