"""Man pages, Markdown CLI docs and shell completions, generated from the CLI itself.

One walker over ``typer.main.get_command(app)`` feeds all three, so they cannot drift from the code;
``scripts/gen_docs.py --check`` (run by the tests) fails when the committed files are stale.
Completions are static scripts: they list commands, options, and the method/metric/model names
known at generation time, and never start Python while the user types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from cloak import __version__

MAN_DATE = "2026-11"  # fixed so regenerated pages are byte-identical across days


@dataclass
class Opt:
    names: list[str]
    help: str
    takes_value: bool
    metavar: str
    choices: list[str] = field(default_factory=list)
    files: bool = False  # the value is a path: complete file names (never for numbers or names)


@dataclass
class Cmd:
    path: list[str]
    help: str
    epilog: str
    options: list[Opt]
    arguments: list[tuple[str, str]]
    children: list["Cmd"]


def _clean(text: str | None) -> str:
    text = text or ""
    text = re.sub(r"\[/?(bold|red|green|yellow|italic|dim)[^\]]*\]", "", text)
    return text.strip()


def walk(command=None, path: list[str] | None = None) -> Cmd:
    import typer.main

    from cloak.cli import app

    command = command or typer.main.get_command(app)
    path = path or ["cloak"]
    options, arguments = [], []
    for p in command.params:
        if p.param_type_name == "option":
            if getattr(p, "hidden", False):
                continue
            names = list(p.opts) + list(getattr(p, "secondary_opts", []))
            takes = not (getattr(p, "is_flag", False) or getattr(p, "count", False))
            options.append(Opt(names, _clean(getattr(p, "help", "")), takes, (p.metavar or p.name or "").upper()
                               if takes else "", _choices_for(names), takes and _is_path(p)))
        else:
            arguments.append(((p.metavar or p.name).upper(), _clean(getattr(p, "help", ""))))
    options.append(Opt(["--help"], "Show this message and exit.", False, ""))
    children = []
    for name, sub in sorted(getattr(command, "commands", {}).items(), key=lambda kv: _order(kv[0])):
        if getattr(sub, "hidden", False):
            continue
        children.append(walk(sub, path + [name]))
    return Cmd(path, _clean(command.help), _clean(command.epilog), options, arguments, children)


# Options typed str that name a file or folder (the others are numbers, names or key=value).
_PATH_OPTIONS = {"config", "cache_dir"}


def _is_path(param) -> bool:
    try:
        kind = param.bare_type()
    except (AttributeError, AssertionError):
        kind = ""
    return kind in ("Path", "list[Path]") or param.name in _PATH_OPTIONS


def argument_words(cmd: Cmd) -> list[str] | None:
    """Words for a command's positional arguments; None where they are files (the verbs' folders)."""
    from cloak.cli.methods import registries

    leaf = cmd.path[1:]
    if leaf == ["methods"]:
        regs = registries()
        return sorted(set(regs) | {"show"} | {n for r in regs.values() for n in r.names()})
    if leaf[:1] == ["models"] and leaf[1:] in (["pull"], ["path"], ["verify"], ["rm"]):
        from cloak.models.catalog import ids

        return ids()
    if leaf == ["completion"]:
        return ["bash", "zsh", "fish"]
    return None


def option_keys(cmd: Cmd) -> list[str]:
    """``KEY=`` for every option of the verb's methods (``METRIC.KEY=`` for score), for ``-o``."""
    from cloak.cli.methods import registries

    regs = registries()
    verb = cmd.path[1] if len(cmd.path) > 1 else ""
    if verb not in regs:
        return []
    keys = set()
    for name in regs[verb].names():
        for row in regs[verb].get(name).option_table():
            keys.add(f"{name}.{row['name']}=" if verb == "score" else f"{row['name']}=")
    return sorted(keys)


_ORDER = ["protect", "immunize", "purify", "attack", "score", "models", "methods", "config", "completion"]


def _order(name: str) -> tuple[int, str]:
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


def _choices_for(names: list[str]) -> list[str]:
    from cloak.cli.methods import registries

    regs = registries()
    if "--eps-unit" in names:
        return ["m11", "01", "255"]
    if "--dtype" in names:
        return ["fp32", "bf16", "fp16"]
    if "--device" in names:
        return ["auto", "cpu", "cuda", "mps"]
    if "--sampler" in names:
        return ["default", "ddim", "pndm", "dpm", "euler", "ddpm"]
    if "--metric" in names:
        return regs["score"].names()
    if "--model" in names:
        from cloak.models.catalog import ids

        return ids("sd")
    return []


def flatten(cmd: Cmd) -> list[Cmd]:
    out = [cmd]
    for c in cmd.children:
        out.extend(flatten(c))
    return out


def _method_choices(cmd: Cmd) -> list[str]:
    from cloak.cli.methods import registries

    regs = registries()
    verb = cmd.path[1] if len(cmd.path) > 1 else ""
    return regs[verb].names() if verb in regs else []


# --- man pages ---------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line.replace("-", "\\-"))
    return "\n".join(lines)


def _roff_paragraphs(text: str) -> str:
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        if not para.strip():
            continue
        if para.startswith("  ") or "\n  " in para:
            out.append(".PP\n.nf\n" + _roff(para) + "\n.fi")
        else:
            out.append(".PP\n" + _roff(" ".join(line.strip() for line in para.splitlines())))
    return "\n".join(out)


def man_page(cmd: Cmd) -> str:
    name = "-".join(cmd.path)
    title = name.upper()
    first = cmd.help.splitlines()[0] if cmd.help else ""
    parts = [f'.TH "{title}" 1 "{MAN_DATE}" "cloak {__version__}" "cloak manual"',
             ".SH NAME", f"{_roff(name)} \\- {_roff(first)}", ".SH SYNOPSIS",
             f".B {_roff(' '.join(cmd.path))}"]
    synopsis = "[OPTIONS]" + "".join(f" {a}" for a, _ in cmd.arguments)
    if cmd.children:
        synopsis = "COMMAND [ARGS]..."
    parts.append(_roff(synopsis))
    parts.append(".SH DESCRIPTION")
    parts.append(_roff_paragraphs(cmd.help))
    if cmd.arguments:
        parts.append(".SH ARGUMENTS")
        for a, h in cmd.arguments:
            parts += [".TP", f".B {_roff(a)}", _roff(h)]
    if cmd.children:
        parts.append(".SH COMMANDS")
        for c in cmd.children:
            summary = c.help.splitlines()[0] if c.help else ""
            parts += [".TP", f".B {_roff(c.path[-1])}", _roff(summary) + f" See \\fB{'-'.join(c.path)}\\fR(1)."]
    parts.append(".SH OPTIONS")
    for o in cmd.options:
        head = ", ".join(o.names) + (f" {o.metavar}" if o.takes_value and o.metavar else "")
        parts += [".TP", f".B {_roff(head)}", _roff(o.help or "")]
    if cmd.epilog:
        parts.append(".SH EXAMPLES")
        parts.append(_roff_paragraphs(cmd.epilog.replace("Examples:", "").strip()))
    if len(cmd.path) == 1:
        parts.append(".SH EXIT STATUS")
        parts.append(_roff_paragraphs("0 ok; 1 runtime error; 2 usage or configuration error; 3 bad input; "
                                      "4 model unavailable; 5 partial failure (--keep-going); 6 score gate failed; "
                                      "130 interrupted."))
        parts.append(".SH ENVIRONMENT")
        parts.append(_roff_paragraphs("CLOAK_CACHE_DIR (model cache), CLOAK_DEVICE, CLOAK_CONFIG, CLOAK_OFFLINE, "
                                      "CLOAK_MIRROR and HF_ENDPOINT (mirrors for cloak models pull), "
                                      "CLOAK_DEBUG=1 (tracebacks), NO_COLOR."))
    see = sorted({"cloak"} | {"-".join(c.path) for c in cmd.children} - {name})
    parts += [".SH SEE ALSO", ", ".join(f"\\fB{_roff(s)}\\fR(1)" for s in see)]
    return "\n".join(parts) + "\n"


def man_pages() -> dict[str, str]:
    return {f"man/{'-'.join(c.path)}.1": man_page(c) for c in flatten(walk())}


# --- markdown -----------------------------------------------------------------------------------------


def markdown() -> str:
    out = ["# cloak command-line reference", "", "Generated by `scripts/gen_docs.py` from the CLI; do not edit.", ""]
    for c in flatten(walk()):
        out += [f"## `{' '.join(c.path)}`", "", c.help, ""]
        if c.arguments:
            out += ["Arguments:", ""] + [f"- `{a}`: {h}" for a, h in c.arguments] + [""]
        if c.children:
            out += ["Commands:", ""] + [f"- `{ch.path[-1]}`: {ch.help.splitlines()[0] if ch.help else ''}"
                                        for ch in c.children] + [""]
        out += ["Options:", ""]
        for o in c.options:
            head = ", ".join(f"`{n}`" for n in o.names) + (f" {o.metavar}" if o.takes_value and o.metavar else "")
            out.append(f"- {head}: {o.help}")
        out.append("")
        if c.epilog:
            out += ["```", c.epilog, "```", ""]
    return "\n".join(out).rstrip() + "\n"


# --- completions ----------------------------------------------------------------------------------------


def _value_words(cmd: Cmd, opt: Opt) -> list[str]:
    if opt.names[0] in ("--method", "-m") or "--method" in opt.names:
        return _method_choices(cmd)
    if "--option" in opt.names:
        return option_keys(cmd)
    return opt.choices


def bash() -> str:
    root = walk()
    lines = ["# bash completion for cloak (generated by scripts/gen_docs.py; do not edit)",
             "_cloak() {", '  local cur prev words cword', '  cur="${COMP_WORDS[COMP_CWORD]}"',
             '  prev="${COMP_WORDS[COMP_CWORD-1]}"', '  local path=""', "  local i",
             '  for ((i=1; i<COMP_CWORD; i++)); do',
             '    case "${COMP_WORDS[i]}" in -*) ;; *) path="$path ${COMP_WORDS[i]}" ;; esac', "  done",
             '  path="${path# }"', '  case "$path" in']
    for c in flatten(root):
        key = " ".join(c.path[1:])
        pattern = f'"{key}"*' if key else '""'
        if c.children:
            pattern = f'"{key}"' if key else '""'
        words = [ch.path[-1] for ch in c.children] + [n for o in c.options for n in o.names]
        lines.append(f"    {pattern})")
        value_cases = [(o, _value_words(c, o)) for o in c.options if o.takes_value]
        lines.append('      case "$prev" in')
        for o, vals in value_cases:
            names = "|".join(o.names)
            if vals and all(v.endswith("=") for v in vals):  # KEY=: the value follows without a space
                lines.append(f'        {names}) COMPREPLY=($(compgen -W "{" ".join(vals)}" -- "$cur")); '
                             'compopt -o nospace 2>/dev/null; return ;;')
            elif vals:
                lines.append(f'        {names}) COMPREPLY=($(compgen -W "{" ".join(vals)}" -- "$cur")); return ;;')
            elif o.files:
                lines.append(f'        {names}) COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null; '
                             'return ;;')
            else:  # a number or a free-form name: nothing to offer, and no file names
                lines.append(f'        {names}) COMPREPLY=(); return ;;')
        lines.append("      esac")
        arg_words = argument_words(c)
        if c.arguments and not c.children and arg_words is not None:
            lines.append(f'      COMPREPLY=($(compgen -W "{" ".join(words + arg_words)}" -- "$cur")); return ;;')
        elif c.arguments and not c.children:
            lines.append(f'      if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "{" ".join(words)}" -- "$cur"));'
                         ' else COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null; fi; return ;;')
        else:
            lines.append(f'      COMPREPLY=($(compgen -W "{" ".join(words)}" -- "$cur")); return ;;')
    lines += ["  esac", "}", "complete -F _cloak cloak", ""]
    return "\n".join(lines)


def zsh() -> str:
    root = walk()
    lines = ["#compdef cloak", "# zsh completion for cloak (generated by scripts/gen_docs.py; do not edit)", "",
             "_cloak() {", "  local -a words_path", "  local w", "  for w in ${words[2,CURRENT-1]}; do",
             "    [[ $w == -* ]] || words_path+=$w", "  done", '  case "${words_path[*]}" in']
    for c in flatten(root):
        key = " ".join(c.path[1:])
        pattern = f'"{key}"' if c.children or not key else f'"{key}"*'
        lines.append(f"    {pattern})")
        specs = []
        for o in c.options:
            desc = (o.help.splitlines()[0] if o.help else "").replace("'", "").replace("[", "(").replace("]", ")")
            desc = desc.replace(":", " ")
            for n in o.names:
                if o.takes_value:
                    vals = _value_words(c, o)
                    action = f"({' '.join(vals)})" if vals else ("_files" if o.files else " ")
                    specs.append(f"'{n}[{desc}]:{o.metavar.lower() or 'value'}:{action}'")
                else:
                    specs.append(f"'{n}[{desc}]'")
        if c.children:
            subs = " ".join(f"'{ch.path[-1]}:{(ch.help.splitlines()[0] if ch.help else '').replace(chr(39), '')}'"
                            .replace("[", "(").replace("]", ")") for ch in c.children)
            lines.append(f"      local -a subcmds; subcmds=({subs})")
            lines.append("      _describe 'command' subcmds")
            lines.append(f"      _arguments {' '.join(specs)}")
        elif argument_words(c) is not None:
            lines.append(f"      _arguments {' '.join(specs)} '*:word:({' '.join(argument_words(c))})'")
        else:
            lines.append(f"      _arguments {' '.join(specs)} '*:file:_files'")
        lines.append("      ;;")
    lines += ["  esac", "}", "", 'if [ "$funcstack[1]" = "_cloak" ]; then _cloak "$@"; else compdef _cloak cloak; fi',
              ""]
    return "\n".join(lines)


def fish() -> str:
    root = walk()
    lines = ["# fish completion for cloak (generated by scripts/gen_docs.py; do not edit)",
             "complete -c cloak -f"]
    top = [c.path[-1] for c in root.children]
    lines.append(f"complete -c cloak -n 'not __fish_seen_subcommand_from {' '.join(top)}' -a '{' '.join(top)}'")
    for c in flatten(root):
        if len(c.path) < 2:
            continue
        cond = " && ".join(f"__fish_seen_subcommand_from {p}" for p in c.path[1:])
        if c.children:
            subs = " ".join(ch.path[-1] for ch in c.children)
            lines.append(f"complete -c cloak -n '{cond}' -a '{subs}'")
        for o in c.options:
            longs = [n[2:] for n in o.names if n.startswith("--")]
            shorts = [n[1:] for n in o.names if n.startswith("-") and not n.startswith("--")]
            if not longs and not shorts:
                continue
            desc = (o.help.splitlines()[0] if o.help else "").replace("'", "")
            parts = [f"complete -c cloak -n '{cond}'"]
            parts += [f"-l {n}" for n in longs] + [f"-s {n}" for n in shorts]
            if o.takes_value:
                vals = _value_words(c, o)
                parts.append(f"-x -a '{' '.join(vals)}'" if vals else ("-r -F" if o.files else "-x"))
            parts.append(f"-d '{desc[:80]}'")
            lines.append(" ".join(parts))
        if c.arguments and not c.children:
            arg_words = argument_words(c)
            lines.append(f"complete -c cloak -n '{cond}' -a '{' '.join(arg_words)}'" if arg_words is not None
                         else f"complete -c cloak -n '{cond}' -F")
    return "\n".join(lines) + "\n"


def completions() -> dict[str, str]:
    return {"completions/cloak.bash": bash(), "completions/_cloak": zsh(), "completions/cloak.fish": fish()}


def all_files() -> dict[str, str]:
    files = {"docs/cli.md": markdown()}
    files.update(man_pages())
    files.update(completions())
    return files
