"""The man pages document every CLI verb and option and every config key.

The lists come from the code, never from a copy here, so a verb, option or
key added anywhere (scistreamd/ctl/args.py's parser, scistreamd/config.py's
Config, scistreamd/daemon.py's options) fails this test until its man page
names it:

- scistreamctl(1): each verb as a ``.TP`` item of VERBS (``.B verb ...``), each
  of the verb's options within that verb's items or, when several verbs share
  it, in another section (REMOTE MODE ...; not SYNOPSIS or EXAMPLES), each
  global option in GLOBAL OPTIONS;
- scistreamd.toml(5): each key as a ``.TP`` item (``.BR key " (type ..."``);
- scistreamd(8): each daemon option as a ``.TP`` item of OPTIONS.

Needs neither the build tools nor a test bed.
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Set

import pytest

from scistreamd.config import Config
from scistreamd.ctl.args import build_parser

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "docs" / "man"


def roff_text(line: str) -> str:
    """A roff source line as plain words: escapes and font macros dropped."""
    line = line.replace("\\-", "-").replace("\\(dq", '"')
    line = re.sub(r"\\f[BIRP]", "", line)
    line = re.sub(r"^\.(B|I|BR|BI|RB|IR|RI|IB)\s+", "", line)
    return line.replace('"', "")


def sections(page: str) -> Dict[str, List[str]]:
    """``.SH`` name -> its source lines."""
    out: Dict[str, List[str]] = {}
    current = ""
    for line in (MAN / page).read_text().splitlines():
        m = re.match(r"^\.SH\s+(.*)", line)
        if m:
            current = m.group(1).strip('"')
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def tp_heads(lines: List[str]) -> List[str]:
    """The tag lines of ``.TP`` items (the line after each ``.TP``, or ``.TQ``
    for a further tag of the same item), as text."""
    return [roff_text(lines[i + 1]) for i, line in enumerate(lines[:-1])
            if line.startswith((".TP", ".TQ"))]


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("scistreamctl's parser has no verbs")


def _options(parser: argparse.ArgumentParser) -> Set[str]:
    """Documented options: the long spellings, without --help and hidden ones."""
    return {opt for action in parser._actions if action.help != argparse.SUPPRESS
            for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


PARSER = build_parser()
VERBS = _subparsers(PARSER)


def test_the_code_has_what_the_test_reads() -> None:
    # The test would pass vacuously if the parser or Config changed shape.
    assert {"inbound-request", "outbound-request", "release", "list", "status"} <= set(VERBS)
    assert "listen_address" in {f.name for f in fields(Config)}


# ---------------------------------------------------------------------------
# scistreamctl(1)


def _verb_items(verb: str) -> List[str]:
    """The VERBS section's lines that belong to ``verb``: from each ``.TP`` item
    whose tag starts with it to the next item of another verb."""
    lines = sections("scistreamctl.1")["VERBS"]
    out: List[str] = []
    inside = False
    for i, line in enumerate(lines):
        if line.startswith(".TP") and i + 1 < len(lines):
            tag = roff_text(lines[i + 1]).split()
            if tag and tag[0] in VERBS:
                inside = tag[0] == verb
        if inside:
            out.append(line)
    return out


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_scistreamctl_man_page_has_every_verb(verb: str) -> None:
    heads = [h.split()[0] for h in tp_heads(sections("scistreamctl.1")["VERBS"]) if h.split()]
    assert verb in heads, (f"scistreamctl(1) has no VERBS item for `{verb}` "
                           "(add `.TP` / `.B " + verb.replace("-", "\\-") + " ...` to "
                           "docs/man/scistreamctl.1)")


def _shared_option_text() -> str:
    """The sections where options that several verbs share are documented once
    (GLOBAL OPTIONS, REMOTE MODE, ...): all but VERBS and the mere listings."""
    return " ".join(roff_text(line) for name, lines in sections("scistreamctl.1").items()
                    if name not in ("VERBS", "SYNOPSIS", "EXAMPLES", "EXAMPLE")
                    for line in lines)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_scistreamctl_man_page_has_every_option_of_each_verb(verb: str) -> None:
    text = " ".join(roff_text(line) for line in _verb_items(verb)) + " " + _shared_option_text()
    # The global options are accepted after every verb too; GLOBAL OPTIONS has them.
    missing = sorted(o for o in _options(VERBS[verb]) - _options(PARSER)
                     if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text))
    assert not missing, (f"scistreamctl(1) does not document {missing} of `{verb}`, neither under "
                         "the verb nor in a section of shared options")


def test_scistreamctl_man_page_has_every_global_option() -> None:
    text = " ".join(roff_text(line) for line in sections("scistreamctl.1")["GLOBAL OPTIONS"])
    missing = sorted(o for o in _options(PARSER)
                     if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text))
    assert not missing, f"scistreamctl(1) GLOBAL OPTIONS lacks {missing}"


# ---------------------------------------------------------------------------
# scistreamd.toml(5)

KEYS = sorted(f.name for f in fields(Config) if f.name != "sources")


@pytest.mark.parametrize("key", KEYS)
def test_config_man_page_has_every_key(key: str) -> None:
    heads: Set[str] = set()
    for lines in sections("scistreamd.toml.5").values():
        heads |= {h.split()[0] for h in tp_heads(lines) if h.split()}
    assert key in heads, (f"scistreamd.toml(5) has no item for the config key `{key}` "
                          "(add `.TP` / `.BR " + key + " \" (type, default \" ... )`)")


@pytest.mark.parametrize("key", KEYS)
def test_default_config_file_names_every_key(key: str) -> None:
    # etc/scistreamd.toml shows every key commented out with its default.
    text = (ROOT / "etc" / "scistreamd.toml").read_text()
    assert re.search(rf"^#\s*{key}\s*=", text, re.M), f"etc/scistreamd.toml lacks #{key} = ..."


# ---------------------------------------------------------------------------
# scistreamd(8)


def _daemon_options() -> Set[str]:
    """The long options scistreamd.daemon.main() adds (read from its source:
    the parser is built inside main())."""
    tree = ast.parse((ROOT / "scistreamd" / "daemon.py").read_text())
    out: Set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            out |= {a.value for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return out


def test_scistreamd_man_page_has_every_option() -> None:
    options = _daemon_options()
    assert {"--config", "--check-config", "--generate-cert"} <= options
    heads = " ".join(tp_heads(sections("scistreamd.8")["OPTIONS"]))
    missing = sorted(o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])",
                                                         heads))
    assert not missing, f"scistreamd(8) OPTIONS lacks {missing}"


def test_the_checks_can_fail() -> None:
    # A verb and a key that do not exist are not found in the pages.
    heads = [h.split()[0] for h in tp_heads(sections("scistreamctl.1")["VERBS"]) if h.split()]
    assert "no-such-verb" not in heads
    all_heads: Set[str] = set()
    for lines in sections("scistreamd.toml.5").values():
        all_heads |= {h.split()[0] for h in tp_heads(lines) if h.split()}
    assert "no_such_key" not in all_heads and "listen_address" in all_heads


# ---------------------------------------------------------------------------
# the example drop-in shipped in /usr/share/doc/scistreamd/examples/


def test_example_dropin_is_a_valid_config_that_changes_what_it_says() -> None:
    from scistreamd.config import load_config

    example = ROOT / "docs" / "examples" / "local.toml"
    config = load_config(ROOT / "etc" / "scistreamd.toml", example.parent)
    assert str(config.listen_address) == "192.0.2.10"
    assert [rule.text for rule in config.allowed_targets] == ["192.0.2.0/24"]
    assert config.sources["listen_address"].endswith("docs/examples/local.toml")
