"""ossforge data (not built yet)."""

from ossforge.errors import UserError


def add_arguments(p):
    pass


def run(args):
    raise UserError("ossforge data: not implemented yet")
