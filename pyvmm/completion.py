"""`pyvmm completion bash`: a bash completion script for pyvmm, made from
the argument parsers themselves so that it never falls behind them: the
verbs, the boot flags, the running guests' names (`pyvmm list --names`)
wherever a verb takes one, sub-commands given as choices, and file names
elsewhere.

    eval "$(pyvmm completion bash)"                     # this shell
    pyvmm completion bash > /etc/bash_completion.d/pyvmm
"""
from __future__ import annotations

import argparse
import shlex

__all__ = ["bash_script"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:                      # argparse keeps them nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and a.dest != "help"]


def bash_script() -> str:
    from pyvmm import cli, manage

    verbs = dict(_subparsers(manage.build_parser()), create=cli.build_create_parser())
    cases = []
    for verb, sub in sorted(verbs.items()):
        # what each word position after the verb completes to
        words = []
        for action in _positionals(sub):
            if action.dest == "name":
                words.append('$(pyvmm list --names 2>/dev/null)')
            elif action.choices:
                words.append(" ".join(shlex.quote(str(c)) for c in action.choices))
            else:
                words.append("")                        # files (-o default)
        flags = " ".join(_flags(sub))
        arms = "".join(f"            {i + 2}) words=\"{w}\" ;;\n" for i, w in enumerate(words) if w)
        cases.append(f"        {verb})\n"
                     f"          [[ $cur == -* ]] && words=\"{flags}\"\n"
                     f"          [[ $cur == -* ]] || case $COMP_CWORD in\n{arms}"
                     f"          esac ;;\n")
    boot_flags = " ".join(_flags(cli.build_parser()))
    top = " ".join(sorted(verbs)) + " " + boot_flags
    return f"""# bash completion for pyvmm (made by `pyvmm completion bash`)
_pyvmm() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} words=""
    if (( COMP_CWORD == 1 )); then
        words="{top}"
    else
        case ${{COMP_WORDS[1]}} in
{''.join(cases)}        *)
          [[ $cur == -* ]] && words="{boot_flags}" ;;
        esac
    fi
    [[ -n $words ]] && COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _pyvmm pyvmm
"""
