"""The README's paragraph on the teacher's limits names only flags that ``fuseflow teacher serve`` has, with
the defaults its ``--help`` gives (issue 15)."""

from __future__ import annotations

import re
from pathlib import Path

from fuseflow.config import OnlineConfig, ServeConfig
from fuseflow.teacher.serve import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_teacher_limits_match_the_flags():
    text = README.read_text()
    start = text.index("A teacher bounds what one request may cost")
    paragraph = text[start : text.index("\n\n", start)]
    parser = build_parser()
    actions = {flag: a for a in parser._actions for flag in a.option_strings}
    named = re.findall(r"`(--[a-z-]+)`(?: \(([\d.]+)\))?", paragraph)
    limits = {a.option_strings[0] for g in parser._action_groups if g.title == "limits" for a in g._group_actions}
    assert limits <= {flag for flag, _ in named}, "a limit flag is missing from the README"
    for flag, default in named:
        assert flag in actions, f"README names {flag}, which `fuseflow teacher serve` does not have"
        if default:  # a field flag: its default is the config field's (dest "serve.max_texts")
            section, field = actions[flag].dest.split(".")
            model = {"serve": ServeConfig, "online": OnlineConfig}[section]
            assert float(model.model_fields[field].default) == float(default), f"README gives {flag} the default {default}"
