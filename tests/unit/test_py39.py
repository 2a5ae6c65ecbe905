"""The shipped code runs on Python 3.9 (RHEL 9's system Python), checked statically.

No 3.9 interpreter is at hand here, so two static checks stand in for one:

1. An AST pass (this file, stdlib only, so it always runs): the source must
   parse with ``feature_version=(3, 9)`` (which rejects ``match``,
   ``except*``, PEP 695 ...); no ``X | Y`` of types where it is evaluated at
   run time (``isinstance(x, int | str)``, ``Maybe = int | None``, and any
   annotation in a module without ``from __future__ import annotations``);
   none of the 3.10+/3.11+ standard-library names in NEWER_STDLIB (imported
   or as ``module.name``); none of the keyword arguments added after 3.9 in
   NEWER_KWARGS (``zip(strict=)``, ``dataclass(slots=)`` ...).
2. ruff, the project's linter (``make lint``), as a second opinion when it is
   installed: ``--target-version py39`` makes its parser report newer syntax
   as ``invalid-syntax`` whatever rules are selected; FA102 reports ``X | Y``
   annotations without the __future__ import; TID251 (banned-api) the names
   of NEWER_STDLIB.

Why not vermin: it is not packaged in Debian 12 (pip only), and its union-type
detection is a self-declared unstable heuristic that reports 11 false positives
in this tree (``os.O_WRONLY | os.O_CREAT``, ``ctx.options |= ssl.OP_...``, and
annotations under ``from __future__ import annotations``); without it, it
misses runtime unions entirely. Neither does ruff catch runtime unions, hence
the AST pass, which knows which operands are types (None, builtin types,
capitalised class names, subscripted generics; ALL_CAPS flags are not).

Each check is proven able to fail: ``test_catches`` runs both on small bad
snippets and expects a finding from each, and ``test_allows`` expects none
for the 3.9-valid look-alikes (flags, sets, lazy annotations).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, List

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: What runs on the gateways: the package and the packages' entry points.
SHIPPED = [ROOT / "scistreamd", ROOT / "packaging" / "bin"]

#: Standard-library names newer than 3.9 (module or module.attribute) -> version.
NEWER_STDLIB = {
    "tomllib": "3.11",
    "asyncio.TaskGroup": "3.11",
    "asyncio.timeout": "3.11",
    "asyncio.timeout_at": "3.11",
    "asyncio.Runner": "3.11",
    "contextlib.aclosing": "3.10",
    "contextlib.chdir": "3.11",
    "datetime.UTC": "3.11",
    "enum.StrEnum": "3.11",
    "itertools.pairwise": "3.10",
    "itertools.batched": "3.12",
    "typing.TypeAlias": "3.10",
    "typing.ParamSpec": "3.10",
    "typing.Concatenate": "3.10",
    "typing.TypeGuard": "3.10",
    "typing.Self": "3.11",
    "typing.Never": "3.11",
    "typing.LiteralString": "3.11",
    "typing.assert_never": "3.11",
    "typing.override": "3.12",
    "hashlib.file_digest": "3.11",
    "wsgiref.types": "3.11",
}

#: Keyword arguments added after 3.9: (callable name as written, keyword) -> version.
NEWER_KWARGS = {
    ("zip", "strict"): "3.10",
    ("dataclass", "slots"): "3.10",
    ("dataclass", "kw_only"): "3.10",
    ("dataclass", "match_args"): "3.10",
    ("field", "kw_only"): "3.10",
    ("bisect", "key"): "3.10",
    ("bisect_left", "key"): "3.10",
    ("bisect_right", "key"): "3.10",
    ("insort", "key"): "3.10",
    ("create_subprocess_exec", "process_group"): "3.11",
    ("Popen", "process_group"): "3.11",
    ("run", "process_group"): "3.11",
}

BUILTIN_TYPES = {"None", "int", "str", "bytes", "float", "bool", "complex", "list", "dict",
                 "tuple", "set", "frozenset", "type", "object", "bytearray", "memoryview"}
#: A class-like name: capitalised and not ALL_CAPS (constants and flags are ALL_CAPS).
CLASS_NAME = re.compile(r"^_?[A-Z]\w*[a-z]\w*$")


def python_files(paths: Iterable[Path]) -> List[Path]:
    files: List[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and (
                f.suffix == ".py" or (not f.suffix and f.read_bytes()[:30].startswith(b"#!")
                                      and b"python" in f.read_bytes()[:30])))
        else:
            files.append(p)
    return files


# ---------------------------------------------------------------------------
# 1. ruff


RUFF = shutil.which("ruff")
needs_ruff = pytest.mark.skipif(RUFF is None, reason="ruff is missing (the project's linter, "
                                "`make lint`): pip install ruff; the AST check still runs")


def ruff_findings(files: List[Path]) -> List[str]:
    ruff = RUFF
    assert ruff is not None
    banned = ", ".join(f'"{name}" = {{msg = "new in Python {v}; scistreamd supports 3.9"}}'
                       for name, v in NEWER_STDLIB.items())
    proc = subprocess.run(
        [ruff, "check", "--isolated", "--no-cache", "--target-version", "py39",
         "--select", "FA102,TID251", "--output-format", "json",
         "--config", f"lint.flake8-tidy-imports.banned-api = {{{banned}}}",
         *map(str, files)],
        capture_output=True, text=True)
    assert proc.returncode in (0, 1), f"ruff failed: {proc.stderr}"
    return [f"{Path(d['filename']).name}:{d['location']['row']}: "
            f"{d['code'] or 'invalid-syntax'} {d['message']}" for d in json.loads(proc.stdout)]


# ---------------------------------------------------------------------------
# 2. the AST pass


def _is_type_operand(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type_operand(node.left) or _is_type_operand(node.right)
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Name):
        return node.id in BUILTIN_TYPES or bool(CLASS_NAME.match(node.id))
    if isinstance(node, ast.Attribute):
        return bool(CLASS_NAME.match(node.attr))
    # A generic alias: List[int] | None, Optional[X] | Y.
    return isinstance(node, ast.Subscript)


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def ast_findings(source: str, filename: str) -> List[str]:
    try:
        tree = ast.parse(source, filename, feature_version=(3, 9))
    except SyntaxError as e:
        return [f"{filename}:{e.lineno}: not Python 3.9 syntax: {e.msg}"]
    lazy = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body)
    skip: set = set()
    if lazy:
        # Under the __future__ import annotations are strings, never evaluated.
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.annotation is not None:
                skip.add(id(node.annotation))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
                skip.add(id(node.returns))
            elif isinstance(node, ast.AnnAssign):
                skip.add(id(node.annotation))
    found: List[str] = []

    def visit(node: ast.AST) -> None:
        if id(node) in skip:
            return
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)
                and _is_type_operand(node.left) and _is_type_operand(node.right)):
            found.append(f"{filename}:{node.lineno}: `X | Y` of types evaluated at run time "
                         "needs Python 3.10 (use typing.Union/Optional, or keep it in an "
                         "annotation under `from __future__ import annotations`)")
            return
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        for name in names:
            if name in NEWER_STDLIB:
                found.append(f"{filename}:{node.lineno}: {name} needs Python "
                             f"{NEWER_STDLIB[name]}")
        if isinstance(node, ast.Call):
            name = _call_name(node.func)
            for kw in node.keywords:
                version = NEWER_KWARGS.get((name, kw.arg or ""))
                if version:
                    found.append(f"{filename}:{node.lineno}: {name}({kw.arg}=...) needs "
                                 f"Python {version}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def ast_check(files: List[Path]) -> List[str]:
    out: List[str] = []
    for f in files:
        out += ast_findings(f.read_text(), f.name)
    return out


# ---------------------------------------------------------------------------
# the tests


def shipped_files() -> List[Path]:
    files = python_files(SHIPPED)
    assert len(files) > 30 and any(f.parent.name == "bin" for f in files), files
    return files


def test_shipped_code_passes_the_ast_check() -> None:
    problems = ast_check(shipped_files())
    assert not problems, "not Python 3.9-compatible:\n" + "\n".join(problems)


@needs_ruff
def test_shipped_code_passes_ruff_py39() -> None:
    problems = ruff_findings(shipped_files())
    assert not problems, "not Python 3.9-compatible (ruff):\n" + "\n".join(problems)


BAD = {
    "match": "def f(x):\n    match x:\n        case 1:\n            return 1\n    return 0\n",
    "except-star": "try:\n    pass\nexcept* ValueError:\n    pass\n",
    "runtime-union-alias": "Maybe = int | None\n",
    "runtime-union-isinstance": "def f(x):\n    return isinstance(x, int | str)\n",
    "runtime-union-class": "from pathlib import Path\nP = Path | str\n",
    "annotation-without-future": "def f(x: int | None) -> None:\n    pass\n",
    "class-annotation-without-future": "class A:\n    x: int | None = None\n",
    "tomllib": "import tomllib\n",
    "taskgroup": "import asyncio\nasync def f():\n    async with asyncio.TaskGroup():\n"
                 "        pass\n",
    "asyncio-timeout": "from asyncio import timeout\n",
    "zip-strict": "print(list(zip([1], [2], strict=True)))\n",
    "dataclass-slots": "from dataclasses import dataclass\n@dataclass(frozen=True, slots=True)\n"
                       "class A:\n    a: int = 0\n",
    "strenum": "from enum import StrEnum\n",
}
#: What ruff catches too (it has no rule for runtime unions and new keywords).
RUFF_CATCHES = {"match", "except-star", "annotation-without-future", "tomllib", "taskgroup",
                "asyncio-timeout", "strenum"}

GOOD = {
    "flags": "import os\nfd = os.open('x', os.O_WRONLY | os.O_CREAT)\n",
    "augmented-flags": "import ssl\nctx = ssl.create_default_context()\n"
                       "ctx.options |= ssl.OP_NO_COMPRESSION\n",
    "sets": "a = {1}\nb = {2}\nc = a | b\nd = set() | frozenset()\n",
    "lazy-annotations": "from __future__ import annotations\nfrom pathlib import Path\n"
                        "def f(x: int | None, p: Path | str = '') -> dict | None:\n"
                        "    y: list[int] | None = None\n    return None\n",
    "typing-union": "from typing import Optional, Union\nMaybe = Optional[int]\n"
                    "E = Union[int, str]\n",
    "zip": "print(list(zip([1], [2])))\n",
    "asyncio-wait-for": "import asyncio\nasync def f(c):\n"
                        "    return await asyncio.wait_for(c, 1)\n",
}


def _snippet(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(BAD))
def test_ast_check_catches(name: str, tmp_path: Path) -> None:
    assert ast_check([_snippet(tmp_path, name, BAD[name])]), f"missed {name}:\n{BAD[name]}"


@needs_ruff
@pytest.mark.parametrize("name", sorted(RUFF_CATCHES))
def test_ruff_catches(name: str, tmp_path: Path) -> None:
    assert ruff_findings([_snippet(tmp_path, name, BAD[name])]), f"missed {name}:\n{BAD[name]}"


@pytest.mark.parametrize("name", sorted(GOOD))
def test_allows(name: str, tmp_path: Path) -> None:
    path = _snippet(tmp_path, name, GOOD[name])
    assert ast_check([path]) == []
    if RUFF is not None:
        assert ruff_findings([path]) == []
