"""User-facing errors: one clear paragraph, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad params, bad data, missing model).

    The message is printed as-is by :func:`qlora_diag.core.cli.run_stage`; it must name the
    offending key, file or value and say what would be valid.
    """


class ParamsError(UserError):
    """One or more problems in ``params.yaml``; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "params.yaml"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")
