"""Reading a Dockerfile and its .dockerignore the way BuildKit does, for the few forms ours uses: global
ARGs with defaults, FROM (with AS and --platform), COPY/ADD with flags, several sources or the JSON
form. No Docker needed: tests/test_deploy.py checks the image's tags and copied paths with these."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Copy:
    """One COPY or ADD: its sources relative to the build context (empty when it copies --from a stage
    or an image, whose paths are not in the context) and its destination."""

    keyword: str
    sources: tuple[str, ...]
    destination: str
    from_stage: str | None


@dataclass(frozen=True)
class Stage:
    name: str | None
    image: str  # with the global ARGs' defaults substituted
    copies: tuple[Copy, ...]


@dataclass(frozen=True)
class Dockerfile:
    global_args: dict[str, str | None]  # ARGs before the first FROM, with their defaults
    stages: tuple[Stage, ...]

    def stage(self, name: str | None) -> Stage:
        (stage,) = [s for s in self.stages if s.name == name]
        return stage


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: continuation lines joined, comment lines dropped (inside a
    continuation too, as Docker drops them), parser directives being comments."""
    found, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = (pending + line).strip(), ""
        if logical:
            keyword, _, rest = logical.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    assert not pending.strip(), "the Dockerfile ends in a line continuation"
    return found


def substitute(text: str, args: dict[str, str | None]) -> str:
    """`$NAME` and `${NAME}` replaced with the ARG's value; an unknown or valueless ARG is an error
    here (Docker would make it empty, which is never what a tag means)."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if args.get(name) is None:
            raise ValueError(f"ARG {name} has no default, used in {text!r}")
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _arg(rest: str) -> tuple[str, str | None]:
    name, equals, default = rest.partition("=")
    return name.strip(), default.strip().strip("\"'") if equals else None


def _copy(keyword: str, rest: str, args: dict[str, str | None]) -> Copy:
    if "<<" in rest:
        raise ValueError(f"{keyword} with a heredoc is not read here: {rest!r}")
    tokens = rest.split()
    flags = {}
    while tokens and tokens[0].startswith("--"):
        name, _, value = tokens.pop(0)[2:].partition("=")
        flags[name] = value
    paths = json.loads(" ".join(tokens)) if tokens and tokens[0].startswith("[") else tokens
    if len(paths) < 2:
        raise ValueError(f"{keyword} needs a source and a destination: {rest!r}")
    from_stage = flags.get("from")
    sources = () if from_stage else tuple(substitute(p, args) for p in paths[:-1])
    return Copy(keyword, sources, paths[-1], from_stage)


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    name = image = None
    stage_args: dict[str, str | None] = {}
    copies: list[Copy] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            if image is not None:
                stages.append(Stage(name, image, tuple(copies)))
            tokens = [t for t in rest.split() if not t.startswith("--platform=")]
            image = substitute(tokens[0], global_args)
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            if len(tokens) not in (1, 3) or (len(tokens) == 3 and name is None):
                raise ValueError(f"FROM {rest!r}: expected IMAGE [AS NAME]")
            stage_args, copies = {}, []
        elif keyword == "ARG":
            arg_name, default = _arg(rest)
            if image is None:
                global_args[arg_name] = default
            else:  # a bare ARG in a stage brings in the global default
                stage_args[arg_name] = default if default is not None else global_args.get(arg_name)
        elif keyword in ("COPY", "ADD"):
            if image is None:
                raise ValueError(f"{keyword} before the first FROM")
            copies.append(_copy(keyword, rest, stage_args))
    if image is None:
        raise ValueError("no FROM in the Dockerfile")
    stages.append(Stage(name, image, tuple(copies)))
    return Dockerfile(global_args, tuple(stages))


# --- .dockerignore ----------------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's pattern as a regex: `*` and `?` within a path element, `**` across any number of them
    (no character classes, which no ignore file here uses)."""
    if "[" in pattern:
        raise ValueError(f"character classes are not read here: {pattern!r}")
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
        i += 1
    return re.compile(out)


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(excludes, pattern) per line of a .dockerignore; a `!` line re-includes what it matches."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        pattern = re.sub(r"/+", "/", pattern).removeprefix("./")
        rules.append((excludes, _pattern_regex(pattern)))
    return rules


def docker_ignores(relative: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the build context leaves this path out: the last rule that matches the path or one of
    its parent folders decides, as BuildKit's pattern matcher does."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for excludes, pattern in rules:
        if any(pattern.fullmatch(p) for p in prefixes):
            ignored = excludes
    return ignored


def dockerignore_of(dockerfile: Path, context: Path) -> Path | None:
    """The ignore file BuildKit uses: `<Dockerfile>.dockerignore` beside the Dockerfile, else the
    context's .dockerignore."""
    for path in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
        if path.exists():
            return path
    return None


def copy_problems(dockerfile: Dockerfile, context: Path, rules: list[tuple[bool, re.Pattern]]) -> list[str]:
    """What a build from `context` would miss: a COPY/ADD source that matches nothing there, or that the
    ignore rules leave out (a folder: every file in it)."""
    problems = []
    for stage in dockerfile.stages:
        for copy in stage.copies:
            for source in copy.sources:
                if re.match(r"[a-z]+://", source):
                    problems.append(f"{copy.keyword} {source}: a URL, not checked here")
                    continue
                matches = sorted(context.glob(source.strip("/"))) if source.strip("/") else [context]
                if not matches:
                    problems.append(f"{copy.keyword} {source}: not in the build context")
                for path in matches:
                    relative = path.relative_to(context).as_posix()
                    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                    if not any(not docker_ignores(f.relative_to(context).as_posix(), rules) for f in files):
                        problems.append(f"{copy.keyword} {source}: {relative} is left out by the .dockerignore")
    return problems
