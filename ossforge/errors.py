"""User-facing errors: one line, exit code 2, no traceback (DESIGN §3)."""


class UserError(Exception):
    """A mistake in the user's input (config, data, flags).

    The message is the whole line after ``error: `` and should start with the file and the
    line or field it is about, e.g. ``configs/x.yaml: lora.r: must be > 0``.
    """

    exit_code = 2


def where(file, field=None) -> str:
    """``file: field`` prefix for a UserError message (``file`` alone when no field)."""
    return f"{file}: {field}" if field else str(file)
