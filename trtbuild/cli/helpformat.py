"""The --help layout of trtbuild's commands: each flag shows its default."""

from __future__ import annotations

import argparse
import copy
import re


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter with the module docstring kept as written, and a default
    shown only where there is one to show: not for switches (store_true/false), not for defaults of None
    (nothing set: the help says what happens then), not where the help text already names its default,
    and also for flags that have no help text."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return (bool(action.option_strings) and action.nargs != 0 and action.default is not None
                and action.default is not argparse.SUPPRESS
                and not re.search(r"\bdefault[: ]", action.help or "", re.I))

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if self._shows_default(action):
            help_text += " (default: %(default)s)"
        return help_text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"  # names its default, so _get_help_string adds nothing
        return super()._format_action(action)
